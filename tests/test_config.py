from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from batch.config import ConfigError, build, load_file


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def source(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    return tmp_path / "src"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", 'api_base = "http://file"\nconcurrency = 2\n'
                                      "[options]\nsmart_skin = true\nacne_removal = true\n")
    config = build((source(tmp_path),), tmp_path / "out", file_values=load_file(cfg),
                   env={"AILAB_API_BASE": "http://env", "AILAB_API_KEY": "sk-canary-env"},
                   flags={"concurrency": 6, "poll_interval": None},
                   option_flags={"acne_removal": False, "pore_control": True})
    assert config.api_base == "http://env"
    assert config.concurrency == 6 and config.poll_interval == 5.0
    assert config.options.fingerprint == "100001000"
    assert config.api_key is not None and config.api_key.reveal() == "sk-canary-env"
    assert "sk-canary-env" not in repr(config) + str(config.api_key)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    key = write(tmp_path / "key", "sk-from-file\n")
    cfg = write(tmp_path / "c.toml", 'api_key_file = "key"\n')
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        build((source(tmp_path),), tmp_path / "o", file_values=load_file(cfg), env={})
    os.chmod(key, 0o600)
    config = build((source(tmp_path),), tmp_path / "o", file_values=load_file(cfg), env={})
    assert config.api_key is not None and config.api_key.reveal() == "sk-from-file"


@pytest.mark.parametrize(("text", "message"), [
    ("concurency = 3\n", "unknown setting: 'concurency' (did you mean 'concurrency'?)"),
    ("smart_skin = true\n", "smart_skin is a retouching option: put it under [options]"),
    ("smart_skn = true\n", "unknown setting: 'smart_skn'; if it is the retouching option "
     "'smart_skin', put it under [options]"),
    ("concurrency = 'many'\n", "concurrency must be a whole number"),
    ('on_ambiguous = "maybe"\n', "on_ambiguous must be one of resubmit, hold"),
    ("[options]\nsmart_skin = 1\n", "must be true or false"),
    ("[options]\nglamour = true\n", "unknown retouching option"),
    ("[options]\nsmart_skn = false\n",  # misspelt, even when switched off
     "unknown retouching option(s): 'smart_skn' (did you mean 'smart_skin'?); known: acne"),
    ("this is = not toml [", "not valid TOML"),
    ("poll_window = 0\n", "poll_window must be at least 1"),
    ("max_credits = 50\n", "max_credits: the key of --max-credits is budget = N"),
    ("max-credits = 50\n", "the key of --max-credits is budget = N"),
    ('api_key = "sk-live-1"\n', "a key is never read from a config file"),
    ("keep_upload_metadata = true\n", 'is upload_metadata = "keep"'),
    ("quiet = true\n", "quiet is a command-line flag only (--quiet)"),
])
def test_bad_config_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build((source(tmp_path),), tmp_path / "o", file_values=load_file(cfg), env={})


def test_sample_config_documents_every_key_and_loads() -> None:
    from batch.config import FILE_KEYS

    sample = Path(__file__).resolve().parent.parent / "sample_config.toml"
    text = sample.read_text()
    tables = [key for key, kind in FILE_KEYS.items() if kind is dict]
    missing = [key for key in FILE_KEYS if key not in tables
               and f"\n{key} =" not in text and f"\n# {key} =" not in text]
    assert not missing, f"sample_config.toml does not document {missing}"
    assert all(f"\n[{table}]\n" in text for table in tables), tables
    values = load_file(sample)
    assert values["poll_interval"] == 5.0 and values["on_collision"] == "skip"


def test_roots_name_a_shared_tree_and_bad_ones_are_refused(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    (nas / "2026" / "wedding").mkdir(parents=True)
    cfg = write(tmp_path / "c.toml", f'[roots]\nshoots = "{nas}"\n')
    config = build((nas / "2026",), tmp_path / "out", file_values=load_file(cfg), env={})
    assert config.root_map.key_for(str(nas / "2026" / "wedding")) == "@shoots/2026/wedding"
    assert config.root_map.key_for(str(nas)) == "@shoots"
    assert config.root_map.key_for(str(tmp_path)) is None
    assert config.root_map.local("@shoots/2026") == nas / "2026"
    assert config.root_map.local("@elsewhere/x") is None
    for bad, message in (('"../x" = "/mnt"', "not a root name"),
                         ('shoots = "relative/path"', "must be absolute"),
                         ("shoots = 3", "must be text in quotes")):
        cfg = write(tmp_path / "bad.toml", f"[roots]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            build((nas,), tmp_path / "out", file_values=load_file(cfg), env={})


def test_an_output_on_a_share_that_is_not_mounted_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The night's --out is on a share the machine mounts at boot, and it failed to mount:
    its mount point is an empty folder of the system disk. A run there would start a new
    ledger and pay again for every photo in the source; it is refused before anything is
    made. Once the share is mounted, the same folder is taken."""
    import subprocess

    from batch import outputs
    from batch.config import prepare_out

    share = tmp_path / "nas"
    share.mkdir()
    table = write(tmp_path / "fstab", "# <file system> <mount point> <type>\n"
                                      f"//nas/photos {share} cifs credentials=/root/.nas 0 0\n")
    monkeypatch.setattr(outputs, "MOUNT_TABLE", table)
    config = build((source(tmp_path),), share / "retouched", file_values={}, env={})
    with pytest.raises(ConfigError, match=re.escape(
            f"is on {share}, where {table} mounts a drive or share, and nothing is mounted")):
        prepare_out(config)
    assert list(share.iterdir()) == []
    from click.testing import CliRunner

    from batch.cli import main
    status = CliRunner().invoke(main, ["status", "--out", str(share / "retouched")])
    assert status.exit_code == 2 and f"{share} is not mounted" in status.output, status.output
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(share)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root in a sandbox that allows it)")
    try:
        assert prepare_out(config) == share / "retouched"
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)
