"""A scanned file as the ledger records it: one plain tuple laid out as :data:`SCAN_ROW`.

The scanner, its worker processes and the ledger share this layout. A tuple, not an object:
a first scan makes one per file, and the workers send them back through a pipe. Imports
nothing from the rest of the package (the workers use it).
"""

from __future__ import annotations

SCAN_ROW = ("root", "rel_path", "out_rel", "size_bytes", "mtime_ns", "content_sha256",
            "options_fp", "problem", "seen_at")

#: root, rel_path, out_rel, size_bytes, mtime_ns, content_sha256 (None when the file could not
#: be read), options_fp, problem (None, or why the file cannot be processed), seen_at.
ScanRow = tuple[str, str, str, int, int, str | None, str, str | None, float]
