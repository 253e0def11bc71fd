"""A TCP proxy in front of the PostgreSQL server that can be cut (every connection dropped, new
ones closed at once) and restored: the database going away and coming back, as a restart or a
network cut looks from the workers, without touching the server other tests use."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class DatabaseProxy:
    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.up = True
        self.cuts = 0
        #: See :meth:`lose_next_commit_answer`.
        self.armed = self.swallowing = False
        self.lost_answers = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """The same database URL, through the proxy."""
        return url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b, to_server in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, to_server), daemon=True).start()

    def lose_next_commit_answer(self) -> None:
        """The next COMMIT reaches the server, which commits; its answer never reaches the
        client, whose connection is then cut, and new ones are taken again (the server
        restarted at that very moment)."""
        self.armed = True

    def _pump(self, source: socket.socket, sink: socket.socket, to_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if not to_server and self.swallowing:
                    continue
                if to_server and self.armed and b"COMMIT\x00" in data:
                    self.armed, self.swallowing = False, True
                    threading.Timer(0.3, self._answer_lost).start()
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        self.cuts += 1
        with self._lock:
            for end in self._open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self._open.clear()

    def restore(self) -> None:
        self.up = True

    def _answer_lost(self) -> None:
        self.cut()
        self.lost_answers += 1
        self.swallowing = False
        self.restore()

    def __enter__(self) -> DatabaseProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.listener.close()
        self.cut()
