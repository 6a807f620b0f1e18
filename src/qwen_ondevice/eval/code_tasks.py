"""A small Python coding benchmark: does a (quantized) model still write working functions?

The package ships original programming tasks in ``data/code_tasks.json``. Each task is a function
signature with a docstring (the prompt), a reference body (the solution) and a ``check(candidate)``
function of asserts (the tests). A model is asked to complete the function (:func:`task_messages`),
the code is taken out of its reply (:func:`extract_program`), and the program runs against the
tests in a separate Python process (:func:`run_program`): a task is solved when every assert holds.
Comparing the solved sets of two models on the same tasks (the float model and its quantized
bundle) is a paired comparison; :mod:`qwen_ondevice.eval.stats` has the interval and test for it.

Model-written code is never executed in this process. Each program runs in a fresh interpreter,
in a fresh temporary directory, with an environment built from scratch, stdin at end of file, a
wall-clock timeout, and (where the ``resource`` module exists) limits on address space, CPU time
and file size. That keeps accidents (an endless loop, a huge list, a stray file) contained; it is
not a security sandbox against code written to escape.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: Address-space limit of a program's process, in bytes.
MEMORY_LIMIT_BYTES = 1 << 30
#: Largest file a program's process may write (its stderr included), in bytes.
FILE_SIZE_LIMIT_BYTES = 16 << 20
#: How much of the end of stderr is read to find the failure reason, in bytes.
_STDERR_TAIL_BYTES = 64 << 10

_FIELDS = ("id", "entry_point", "prompt", "solution", "tests")

# Runs in the child interpreter: set the limits, run the program as a module that is not
# ``__main__`` (so a demo block under ``if __name__ == "__main__":`` does not run, as in the usual
# harnesses), then write the token that proves the tests ran to the end.
_BOOTSTRAP = """\
import sys
program, marker, token = sys.argv[1], sys.argv[2], sys.argv[3]
limits = [int(v) for v in sys.argv[4:7]]
del sys.argv[1:]
try:
    import resource
except ImportError:
    resource = None
if resource is not None:
    names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE")
    for name, value in zip(names, limits):
        which = getattr(resource, name, None)
        if which is None:
            continue
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
import runpy
runpy.run_path(program, run_name="__candidate__")
with open(marker, "w") as f:
    f.write(token)
"""


@dataclass(frozen=True)
class CodeTask:
    """One benchmark task.

    ``prompt`` is a function signature and docstring ending in a newline; ``solution`` is a
    reference body that continues it; ``tests`` defines ``check(candidate)``, which raises
    (normally ``AssertionError``) when the candidate function is wrong.
    """

    id: str
    entry_point: str
    prompt: str
    solution: str
    tests: str


def load_code_tasks(limit: int | None = None) -> list[CodeTask]:
    """The tasks shipped with the package, in file order.

    Args:
        limit: return only the first ``limit`` tasks; ``None`` returns all of them.

    Raises:
        ValueError: ``limit`` is negative, or an entry of the data file lacks a field or has a
            field that is not a string.
        FileNotFoundError: the package was installed without its ``data/code_tasks.json``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    source = resources.files("qwen_ondevice") / "data" / "code_tasks.json"
    entries = json.loads(source.read_text(encoding="utf-8"))
    tasks = [_task_from_entry(entry) for entry in entries]
    return tasks if limit is None else tasks[:limit]


def _task_from_entry(entry: dict) -> CodeTask:
    """A :class:`CodeTask` from one JSON object; ValueError when a field is missing or not text."""
    for name in _FIELDS:
        if not isinstance(entry.get(name), str):
            raise ValueError(f"code task {entry.get('id', '?')!r}: field {name!r} missing or not a string")
    return CodeTask(**{name: entry[name] for name in _FIELDS})


def task_messages(task: CodeTask) -> list[dict]:
    """OpenAI-style chat messages (a single user turn) asking the model to complete the function."""
    content = (
        "Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
        f"```python\n{task.prompt}```"
    )
    return [{"role": "user", "content": content}]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def _fenced_code(reply: str) -> str | None:
    """The first ```python block of the reply, else its first fenced block, else ``None``.

    A block left open at the end of the reply (a reply cut off by the token limit) runs to the
    end of the reply.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(reply)]
    for tag, code in blocks:
        if tag in _PYTHON_TAGS:
            return code
    return blocks[0][1] if blocks else None


def extract_program(task: CodeTask, reply: str) -> str:
    """The Python program to test, taken from a model's reply to :func:`task_messages`.

    The code is the first ```python fenced block of the reply (else its first fenced block of any
    language, else the whole reply). When that code defines the function only indented (the
    model indented everything), it is dedented; when it does not define ``def <entry_point>`` at
    all, the model wrote only the body, so the task prompt is put in front of it (indenting the
    body by four spaces when it starts at column 0). Deterministic: the same reply always gives
    the same program. Never raises.
    """
    code = _fenced_code(reply)
    if code is None:
        code = reply
    name = re.escape(task.entry_point)
    if re.search(rf"^(async\s+)?def\s+{name}\s*\(", code, re.MULTILINE):
        return code
    if re.search(rf"^[ \t]+(async\s+)?def\s+{name}\s*\(", code, re.MULTILINE):
        dedented = textwrap.dedent(code)
        if re.search(rf"^(async\s+)?def\s+{name}\s*\(", dedented, re.MULTILINE):
            return dedented
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first and not first[0].isspace():
        code = textwrap.indent(code, "    ")
    return task.prompt + code


def program_with_tests(task: CodeTask, program: str) -> str:
    """The full script that :func:`run_program` runs: the program, the task's tests, the check."""
    return program + "\n\n" + task.tests + f"\n\ncheck({task.entry_point})\n"


def run_program(task: CodeTask, program: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run ``program`` against the task's tests in a fresh Python process.

    The script :func:`program_with_tests` is written to a fresh temporary directory, which is also the
    working directory; the interpreter is ``sys.executable`` without user site-packages, with an
    environment built from scratch (``PYTHONHASHSEED=0``, so set and dict orders of strings, and
    so the outcome, repeat from run to run), stdin at end of file and stdout discarded. On POSIX
    the process leads its own session, and its whole process group is killed on timeout; where
    the ``resource`` module exists it runs under :data:`MEMORY_LIMIT_BYTES` of address space,
    ``ceil(timeout_s) + 1`` seconds of CPU and :data:`FILE_SIZE_LIMIT_BYTES` per file.

    Args:
        task: the task whose ``tests`` and ``entry_point`` are used.
        program: Python source that defines the function (see :func:`extract_program`).
        timeout_s: wall-clock limit in seconds.

    Returns:
        ``(passed, reason)``: ``(True, "passed")`` when every test passed; otherwise ``False`` and
        ``"timeout"`` (wall-clock or CPU limit), the last line of stderr (like
        ``"AssertionError"`` or ``"NameError: name 'x' is not defined"``), or, with nothing on
        stderr, ``"killed by SIGKILL"``-style, ``"exit status N"`` or ``"exited before the tests
        finished"``.

    Raises:
        ValueError: ``timeout_s`` is not a positive finite number.
    """
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    with tempfile.TemporaryDirectory(prefix="qwen-ondevice-code-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        script = folder / "program.py"
        script.write_text(program_with_tests(task, program), encoding="utf-8")
        marker = folder / "tests-finished"
        token = secrets.token_hex(16)
        limits = (MEMORY_LIMIT_BYTES, math.ceil(timeout_s) + 1, FILE_SIZE_LIMIT_BYTES)
        command = [sys.executable, "-s", "-B", "-c", _BOOTSTRAP, str(script), str(marker), token]
        command += [str(v) for v in limits]
        stderr_path = folder / "stderr.txt"
        with open(stderr_path, "wb") as stderr:
            returncode = _run(command, folder, stderr, timeout_s)
        if returncode is None:
            return False, "timeout"
        finished = marker.exists() and marker.read_text(encoding="utf-8", errors="replace") == token
        if returncode == 0 and finished:
            return True, "passed"
        return False, _failure_reason(returncode, _last_line(stderr_path))


def _child_environment(folder: Path) -> dict[str, str]:
    """The whole environment of a program's process: nothing is inherited from ours."""
    return {
        "PATH": os.defpath,
        "HOME": str(folder),
        "TMPDIR": str(folder),
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _run(command: list[str], folder: Path, stderr, timeout_s: float) -> int | None:
    """Run ``command`` in ``folder``; its exit status, or ``None`` when it ran out of time."""
    posix = os.name == "posix"
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=_child_environment(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=posix,
    )
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(process, posix)
        return None
    except BaseException:
        _kill(process, posix)
        raise


def _kill(process: subprocess.Popen, posix: bool) -> None:
    """Kill the process (and, on POSIX, its whole process group) and reap it."""
    try:
        if posix:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _last_line(path: Path) -> str:
    """The last non-blank line of the end of the file at ``path``, stripped; "" when none."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _STDERR_TAIL_BYTES))
        tail = f.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _failure_reason(returncode: int, last_line: str) -> str:
    """Why a program that ran to its end (or was killed by a signal) did not pass."""
    if hasattr(signal, "SIGXCPU") and returncode == -signal.SIGXCPU:
        return "timeout"
    if last_line:
        return last_line
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode != 0:
        return f"exit status {returncode}"
    return "exited before the tests finished"


def run_programs(
    tasks: list[CodeTask],
    programs: list[str],
    timeout_s: float = 10.0,
    workers: int | None = None,
) -> list[tuple[bool, str]]:
    """:func:`run_program` for each (task, program) pair, a few at a time; results in input order.

    Args:
        tasks: the tasks, one per program.
        programs: the programs, ``programs[i]`` tested against ``tasks[i]``.
        timeout_s: wall-clock limit of each program, in seconds.
        workers: how many programs run at once; ``None`` means the CPU count, at most 8.

    Raises:
        ValueError: the two lists differ in length, ``workers`` is below 1, or ``timeout_s`` is
            not a positive finite number.
    """
    if len(tasks) != len(programs):
        raise ValueError(f"{len(tasks)} tasks but {len(programs)} programs")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: run_program(pair[0], pair[1], timeout_s), zip(tasks, programs)))


def score_programs(
    tasks: list[CodeTask],
    programs: list[str],
    timeout_s: float = 10.0,
    workers: int | None = None,
) -> list[bool]:
    """Whether each program passes its task's tests (see :func:`run_programs` for the arguments
    and the errors raised)."""
    return [passed for passed, _ in run_programs(tasks, programs, timeout_s, workers)]
