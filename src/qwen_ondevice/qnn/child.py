"""Work that runs in a child Python process: QNN compiles, HTP simulator runs and Genie.

The QNN libraries can crash, hang, or abort in their exit-time destructors; a child process keeps
that away from the caller (and a compile's memory is the child's own, measured and then given back).
The child runs ``module:function`` of this package, reads its JSON spec from stdin, and reports by
its stdout lines or a result file the spec names; it leaves with :func:`leave`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: The folder that holds the ``qwen_ondevice`` package, put first on the child's PYTHONPATH.
SRC_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class ChildRun:
    """How a child ended: ``status`` its exit status (negative: killed by that signal) or
    ``"timeout"``; ``stderr`` what it wrote there (the last ``stderr_chars`` characters)."""

    status: int | str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0


def run_child(entry: str, spec: dict, timeout: float | None = None, cwd: Path | None = None,
              env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
              stderr_chars: int | None = 4000) -> ChildRun:
    """Run ``entry`` (``"qwen_ondevice.module:function"``) in a child Python with ``spec`` as JSON on
    its stdin; each stdout line goes to ``on_line`` as the child writes it (dropped when None).

    ``timeout`` (seconds) kills the child; ``env`` adds to this process's environment; ``cwd`` is
    the child's working folder. Returns its :class:`ChildRun`; never raises for what the child does.
    """
    module, _, func = entry.partition(":")
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = SRC_ROOT + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    killed = threading.Event()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", f"from {module} import {func}; {func}()"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, cwd=str(cwd) if cwd else None, env=child_env)

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill) if timeout else None
        if watchdog:
            watchdog.start()
        try:
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
            for raw in proc.stdout:
                if on_line is not None:
                    on_line(raw.decode(errors="replace").rstrip("\n"))
            proc.wait()
        finally:
            if watchdog:
                watchdog.cancel()
            if proc.poll() is None:  # the caller's on_line raised: do not leave the child behind
                proc.kill()
                proc.wait()
        err.seek(0)
        text = err.read().decode(errors="replace")
    return ChildRun("timeout" if killed.is_set() else proc.returncode, text if stderr_chars is None else text[-stderr_chars:])


def read_spec() -> dict:
    """In the child: the spec the parent sent."""
    return json.loads(sys.stdin.read())


def leave(code: int = 0) -> None:
    """In the child: flush and exit at once, skipping the QNN libraries' exit-time destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
