"""The layout of an export in progress: ``BUNDLE/.export/`` and the keys of its stages.

``.export/state.json`` (``export.options.ExportState``) records each finished stage under one
key; the per-part stages are ``<kind>:<part name>`` in the order ``float`` (with ``kveq``, key
equalization, stamped after it), ``calib``, ``part``; then ``report``, the compile stage's
``qnn:<chipset>:O<level>:<part name>`` and ``manifest``. The intermediate files of a kind live in
``.export/<kind>/`` until the export no longer needs them. Everything that writes or reads those
names takes them from here.
"""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".export"
STATE_FILE = "state.json"
FLOAT, KVEQ, CALIB, PART, QNN = "float", "kveq", "calib", "part", "qnn"
REPORT_STAGE, MANIFEST_STAGE = "report", "manifest"


def stage_key(kind: str, part_name: str) -> str:
    """The state key of a per-part stage: ``kind`` (:data:`FLOAT`, :data:`KVEQ`, :data:`CALIB`,
    :data:`PART`) of part ``part_name``."""
    return f"{kind}:{part_name}"


def part_of(key: str, kind: str) -> str | None:
    """The part name of a ``kind`` stage key, or None when ``key`` is not one."""
    return key[len(kind) + 1:] if key.startswith(kind + ":") else None


def qnn_key(chipset: str, level: int | None = None, part_name: str = "") -> str:
    """The compile stage's key of one part (or, with no part, the prefix of a chipset's keys at
    an optimization ``level``, or of all its levels when ``level`` is None)."""
    return f"{QNN}:{chipset}:" + ("" if level is None else f"O{level}:{part_name}")


def work_dir(out: Path, kind: str) -> Path:
    """Where a stage ``kind`` keeps its intermediate files: ``out/.export/<kind>``."""
    return out / STATE_DIR / kind
