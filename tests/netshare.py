"""A network share on loopback: an SSH server of the test's own (its keys made for the test,
on a free port) and a folder mounted through it with sshfs, a real network filesystem
(``fuse.sshfs`` in /proc/mounts), as a studio's NAS share is one."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"  # sshd runs itself again by its absolute path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _server(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """sshd on a free port (another test may take a port between its probe and sshd's bind:
    then another is tried)."""
    for _ in range(5):
        port = _free_port()
        config = work / f"sshd-{port}.conf"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host_key'}\n"
            f"AuthorizedKeysFile {work / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nPidFile none\nSubsystem sftp internal-sftp\n")
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            if _answers(port):
                return server, port
            time.sleep(0.05)
        server.kill()
        server.wait()
    pytest.fail("sshd would not start on a free port")


@contextlib.contextmanager
def mounted(work: Path) -> Iterator[Path]:
    """A folder of ``work`` mounted as a network share; yields its mount point."""
    if shutil.which("sshfs") is None or not os.path.exists(SSHD):
        pytest.skip("needs sshfs and openssh-server (apt-get install sshfs openssh-server)")
    work.mkdir(parents=True)
    export, mount_point = work / "export", work / "share"
    export.mkdir()
    mount_point.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)],
                       check=True)
    shutil.copy(work / "user_key.pub", work / "authorized_keys")
    with contextlib.suppress(OSError):  # sshd's privilege separation, where it runs as root
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    server, port = _server(work)
    try:
        subprocess.run(
            ["sshfs", "-p", str(port), "-o", f"IdentityFile={work / 'user_key'},"
             "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
             f"{getpass.getuser()}@127.0.0.1:{export}", str(mount_point)],
            check=True, capture_output=True, timeout=30)
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
    finally:
        server.terminate()
        server.wait()
