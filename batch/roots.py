"""Source roots as the ledger names them. A tree that several machines mount at different paths
(``/mnt/nas/shoots`` on one, ``/Volumes/shoots`` on another) gets a stable name in each
machine's config (``[roots] shoots = "/mnt/nas/shoots"``), and the ledger records its files
under ``@shoots``; each machine finds them again under its own mount point. A folder no map
names is recorded under its absolute path, which only machines that mount it there reach."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from batch.ledger.store import FileRow

MARK = "@"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RootMap:
    paths: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, mapping: dict[str, str]) -> RootMap:
        for name, path in mapping.items():
            if not isinstance(path, str):
                raise ValueError(f"the path of root {name!r} must be text in quotes")
            if not NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a root name (letters, digits, _ . -)")
            if not Path(path).expanduser().is_absolute():
                raise ValueError(f"the path of root {name!r} must be absolute, not {path!r}")
        return cls({name: Path(path).expanduser().resolve() for name, path in mapping.items()})

    def key_for(self, folder: str) -> str | None:
        """The ledger's name for a local folder under a mapped root (None: none maps it)."""
        local = Path(folder)
        for name, base in self.paths.items():
            if local == base:
                return MARK + name
            if local.is_relative_to(base):
                return f"{MARK}{name}/{local.relative_to(base).as_posix()}"
        return None

    def local(self, root: str) -> Path | None:
        """This machine's folder for a ledger root (None: a name this machine does not map)."""
        if not root.startswith(MARK):
            return Path(root)
        name, _, rest = root[1:].partition("/")
        base = self.paths.get(name)
        if base is None:
            return None
        return base / rest if rest else base

    def localize(self, files: list[FileRow]) -> list[FileRow]:
        """The files this machine reaches, each with its root as this machine's folder."""
        found = []
        for f in files:
            if not f.root.startswith(MARK):
                found.append(f)
            elif (local := self.local(f.root)) is not None:
                found.append(replace(f, root=str(local)))
        return found
