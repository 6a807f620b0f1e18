"""Progress messages on stderr (stdout stays clean for generated text and ``--json``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(msg: str) -> None:
    """Print one progress line to stderr (suppressed by ``set_quiet(True)``)."""
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


@contextmanager
def stage(name: str):
    """Log the start and the wall time (seconds) of a named stage."""
    log(f"[{name}] ...")
    t0 = time.perf_counter()
    yield
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
