"""JSON files written atomically: a reader (or a resumed export after a kill) sees the old file or
the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj, indent: int | None = None, ensure_ascii: bool = True, newline: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same folder and
    ``os.replace`` (atomic on POSIX and Windows). ``newline`` ends the text with one.

    Raises:
        OSError: the folder cannot be written.
        TypeError: ``obj`` is not JSON-serialisable (nothing is written).
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + ("\n" if newline else "")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
