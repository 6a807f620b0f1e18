"""Progress on stderr (stdout stays clean for generated text and ``--json``): one-line messages,
bars for long loops (done/total, rate, time remaining; ``tqdm``), and stage meters that report
each finished stage's wall time and peak RSS."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import psutil
from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> bool:
    """Turn progress output off (True) or on; returns the previous setting, to restore it."""
    global _quiet
    before, _quiet = _quiet, quiet
    return before


def log(msg: str) -> None:
    """Print one progress line to stderr (suppressed by ``set_quiet(True)``)."""
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A ``tqdm`` progress bar on stderr showing done/total, rate and time remaining (disabled
    by ``set_quiet(True)``, and for nothing to do). Off a terminal it redraws at most every 10 s,
    so logs stay short."""
    tty = sys.stderr.isatty()
    size = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=_quiet or size == 0, leave=True,
                mininterval=0.5 if tty else 10.0, dynamic_ncols=tty, ascii=not tty)


def rss_bytes() -> int:
    """This process's resident set size now (bytes)."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (bytes; ``getrusage`` ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageRecord:
    """What :class:`stage_meter` measured: wall time (s) and the peak RSS (bytes) seen while the
    stage ran, sampled every ``interval`` s (and at its start and end)."""

    name: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    written_bytes: int = 0  # bytes this process wrote to storage during the stage (Linux /proc/PID/io)
    start_rss_bytes: int = 0  # RSS when the stage began (after release_memory)


class stage_meter:
    """Context manager timing a stage and sampling its peak RSS in a background thread; logs
    ``[name] done in X s, peak RSS Y GB`` when the stage ends without an error.

    Usage: ``with stage_meter("calib:part_2_of_5") as rec: ...`` then ``rec.seconds``."""

    def __init__(self, name: str, interval: float = 0.2):
        self.record = StageRecord(name)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.record.peak_rss_bytes = max(self.record.peak_rss_bytes, rss_bytes())

    def __enter__(self) -> StageRecord:
        release_memory()
        self.record.peak_rss_bytes = self.record.start_rss_bytes = rss_bytes()
        self._written0 = _written_bytes()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.record

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self.record.seconds = round(time.perf_counter() - self._t0, 2)
        self.record.peak_rss_bytes = max(self.record.peak_rss_bytes, rss_bytes())
        self.record.written_bytes = max(0, _written_bytes() - self._written0)
        if exc_type is None and os.environ.get("QWEN_ONDEVICE_EXPORT_KILL_AFTER") == self.record.name:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: the stage's work done, its stamp not yet written
        if exc_type is None:
            log(f"[{self.record.name}] done in {format_seconds(self.record.seconds)}, "
                f"peak RSS {self.record.peak_rss_bytes / 1e9:.2f} GB")


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``;
    a no-op elsewhere), so that a stage starts from what is really held, not from the high-water
    mark of the one before."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _written_bytes() -> int:
    try:
        return psutil.Process().io_counters().write_bytes
    except (AttributeError, psutil.Error):  # not every platform counts it
        return 0


def format_seconds(s: float) -> str:
    """``42.0 s``, ``12 min 05 s`` or ``1 h 02 min``."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
