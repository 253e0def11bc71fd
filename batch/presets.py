"""Per-folder presets: a ``.skinbatch.toml`` sets options and output naming for its subtree.

    [options]
    smart_skin = true
    acne_removal = false        # a key that is present overrides; absent keys inherit
    naming = "{stem}_retouched{ext}"

Presets layer from the source root down to the file's folder, over the run's own options.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from batch.apispec import OPTION_NAMES
from batch.names import DEFAULT_NAMING
from batch.options import Options, unknown_names

PRESET_NAME = ".skinbatch.toml"


@dataclass(frozen=True, slots=True)
class FolderSettings:
    options: Options
    naming: str = DEFAULT_NAMING
    #: Why files here cannot be processed (an invalid preset), or None.
    problem: str | None = None


def check_naming(template: str) -> str:
    try:
        sample = template.format(stem="photo", ext=".jpg", name="photo.jpg")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"naming {template!r}: use {{stem}}, {{ext}} and {{name}} ({exc})") \
            from None
    if not sample or "/" in sample or "\\" in sample or sample in (".", "..") or \
            sample.startswith("."):
        raise ValueError(f"naming {template!r} must give a plain file name")
    return template


def apply_preset(parent: FolderSettings, preset: Path) -> FolderSettings:
    """The settings for a folder holding ``preset``; an invalid file becomes a problem that
    every file below it reports (so nothing there is sent on a misread preset)."""
    try:
        values = tomllib.loads(preset.read_text(encoding="utf-8-sig"))  # Notepad's BOM
        unknown = set(values) - {"options", "naming"}
        if misplaced := sorted(unknown & set(OPTION_NAMES)):
            raise ValueError(f"{', '.join(misplaced)}: a retouching option goes under [options]")
        if unknown:
            raise ValueError(unknown_names("key(s)", unknown, ["options", "naming"]))
        table = values.get("options", {})
        if not isinstance(table, dict):
            raise ValueError("[options] must be a table")
        enabled = set(parent.options.enabled)
        for name, value in table.items():
            if name not in OPTION_NAMES:
                raise ValueError(unknown_names("option", [name], OPTION_NAMES))
            if not isinstance(value, bool):
                raise ValueError(f"option {name} must be true or false")
            (enabled.add if value else enabled.discard)(name)
        naming = values.get("naming", parent.naming)
        if not isinstance(naming, str):
            raise ValueError("naming must be a string")
        return FolderSettings(Options(frozenset(enabled)), check_naming(naming))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        return replace(parent, problem=f"the folder's {PRESET_NAME} is invalid: {exc}")
