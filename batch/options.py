"""The nine retouching switches and their fingerprint (part of a job's identity)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from batch.apispec import OPTION_NAMES

#: Said before a run in which no option is on: the API takes such a request (each option
#: defaults to off there too) and charges for it, which a forgotten flag makes easy to miss.
NOTHING_ON = ("No retouching option is on (" + ", ".join(
    f"--{name.replace('_', '-')}" for name in OPTION_NAMES) + ", or [options] in --config): "
    "each photo is sent with all nine off, the API's defaults, and charged; only folder presets "
    "turn any on.")


def unknown_names(what: str, names: Iterable[str], known: Iterable[str]) -> str:
    """Names nobody knows, said with the likeliest meant one for each (a typo in a config file
    should cost one glance, not a trip to the documentation) and the ones there are."""
    known = sorted(known)
    said = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1)
        said.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"unknown {what}: {', '.join(said)}; known: {', '.join(known)}"



def redone_words(photos: int) -> str:
    """Said before photos retouched under other options are paid for again: a changed option
    in a nightly config file would otherwise resend the whole archive without a word."""
    return (f"{photos} photo(s) to pay for were retouched before under other options: changed "
            "options send a photo again, paid again, and its new result replaces the earlier "
            "one (give the new options their own --out to keep both).")


def held_words(photos: int) -> str:
    """Said of photos retouched and saved under other options, which a scan holds back (see
    ``batch.scan``): a changed option in a nightly config would resend the whole archive."""
    return (f"{photos} photo(s) were retouched before under other options and are not sent "
            "again unasked: each would be paid again, its new result replacing the saved one. "
            "--pay-again sends them; or give the new options their own --out, to keep both; "
            "or put the options back.")


@dataclass(frozen=True, slots=True)
class Options:
    """Which of the API's nine retouching options are switched on."""

    enabled: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.enabled) - set(OPTION_NAMES)
        if unknown:
            raise ValueError(unknown_names("retouching option(s)", unknown, OPTION_NAMES))

    @classmethod
    def of(cls, names: Iterable[str]) -> Options:
        return cls(frozenset(n.replace("-", "_") for n in names))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Options:
        """Build from a ``{name: bool}`` table such as a config file's ``[options]``."""
        for name, value in values.items():
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} must be true or false, not {value!r}")
        cls.of(values)  # a misspelt option is refused whether it is switched on or off
        return cls.of(name for name, value in values.items() if value)

    @classmethod
    def from_fingerprint(cls, fingerprint: str) -> Options:
        if len(fingerprint) != len(OPTION_NAMES) or set(fingerprint) - {"0", "1"}:
            raise ValueError(f"not an options fingerprint: {fingerprint!r}")
        pairs = zip(OPTION_NAMES, fingerprint, strict=True)
        return cls(frozenset(name for name, bit in pairs if bit == "1"))

    @property
    def fingerprint(self) -> str:
        """One character per option in API order, e.g. ``"110000000"``: stable and readable."""
        return "".join("1" if name in self.enabled else "0" for name in OPTION_NAMES)

    def form_fields(self) -> dict[str, str]:
        """The multipart form fields the submit endpoint expects: every option as "0" or "1"."""
        return {name: ("1" if name in self.enabled else "0") for name in OPTION_NAMES}

    def describe(self) -> str:
        return ", ".join(n for n in OPTION_NAMES if n in self.enabled) or "none"
