"""Genie itself on this host: Qualcomm's ``libGenie.so`` (from the ``onnxruntime-qnn`` wheel) run
in a child process through ``ctypes``.

The child creates a Genie logger at its verbose level (Genie is silent about its failures
without one), binds it to the dialog config, creates the dialog and asks it a query, either as
token ids (``GenieDialog_tokenQuery``: Genie's generated token ids come back) or as text
(``GenieDialog_query``: what ``genie-t2t-run -p`` does). Each step's status and every log line
are reported as they happen, so a crash later in Genie (the x86_64 simulator aborts on a
weight-shared context) still leaves what came before. Nothing of Genie is loaded into the
calling process.

The C API used (Genie 1.x headers ``GenieDialog.h``, ``GenieLog.h``): status 0 is success;
log levels ERROR 1, WARN 2, INFO 3, VERBOSE 4; the log callback receives
``(handle, const char* fmt, level, uint64 timestamp, va_list)`` and is formatted with libc's
``vsnprintf``; sentence code COMPLETE is 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_ondevice.core.progress import log
from qwen_ondevice.qnn.child import leave, read_spec, run_child

#: Genie's verbose log level (GenieLog.h).
LOG_VERBOSE = 4
LOG_LEVELS = {1: "error", 2: "warn", 3: "info", 4: "verbose"}


def genie_library() -> Path | None:
    """``libGenie.so`` of the installed onnxruntime-qnn wheel (None when absent)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    lib = Path(onnxruntime_qnn.__file__).parent / "libGenie.so"
    return lib if lib.exists() else None


@dataclass
class GenieQuery:
    """One query's result: its Genie_Status_t, and the token ids (token query) or the text (text
    query) Genie generated."""

    status: int | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""


@dataclass
class GenieRun:
    """What one Genie child process did.

    ``config_status``/``dialog_status``: the Genie_Status_t of GenieDialogConfig_createFromJson
    and GenieDialog_create (None: not reached); ``queries``: one :class:`GenieQuery` per query
    answered; ``log``: Genie's log lines as (level name, message); ``exit``: the child's exit
    status (negative: killed by that signal) or "timeout".
    """

    config_status: int | None = None
    dialog_status: int | None = None
    queries: list[GenieQuery] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    exit: int | str | None = None
    stderr: str = ""

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lv, m in self.log if level is None or lv == level]

    def to_dict(self) -> dict:
        return {"config_status": self.config_status, "dialog_status": self.dialog_status,
                "queries": [q.__dict__ for q in self.queries], "exit": self.exit, "log_lines": len(self.log)}


def run_genie(config: dict, cwd: Path, queries: list[dict] = (), max_new_tokens: int = 8, create_dialog: bool = True,
              timeout: float = 1800.0) -> GenieRun:
    """Run Genie on the dialog ``config`` (a genie_config.json document) in a child process.

    ``cwd`` is the folder Genie resolves the config's relative paths against (tokenizer,
    extensions). ``queries`` are asked in order on one dialog, reset between them, each for at
    most ``max_new_tokens`` tokens: ``{"ids": [...]}`` (GenieDialog_tokenQuery, the ids sent as
    they are) or ``{"text": "..."}`` (GenieDialog_query: Genie tokenizes it, as ``genie-t2t-run -p``
    does). With no queries and ``create_dialog`` the dialog is only created.

    Raises:
        FileNotFoundError: onnxruntime-qnn has no libGenie.so here.
    """
    lib = genie_library()
    if lib is None:
        raise FileNotFoundError("libGenie.so not found: Genie on the host needs the onnxruntime-qnn wheel (Linux x86_64)")
    libdirs = [str(lib.parent), str(lib.parent.parent / "onnxruntime_qnn.libs")]
    env = {"LD_LIBRARY_PATH": os.pathsep.join(libdirs + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else [])),
           "ADSP_LIBRARY_PATH": str(lib.parent)}
    spec = {"lib": str(lib), "config": json.dumps(config), "queries": list(queries), "max_new_tokens": int(max_new_tokens),
            "create": bool(create_dialog or queries)}
    run = GenieRun()
    state = {"t0": time.perf_counter(), "tokens": 0}

    def on_line(line: str) -> None:  # as the child writes it: progress for long runs on the simulator
        if line.startswith("GENIE_LOG "):
            level, _, msg = line[len("GENIE_LOG "):].partition(" ")
            run.log.append((LOG_LEVELS.get(int(level), level), json.loads(msg)))
        elif line.startswith("GENIE_TOKEN "):
            state["tokens"] += 1
            log(f"[genie] query {len(run.queries) + 1}: token {state['tokens']} after {time.perf_counter() - state['t0']:.1f} s")
        elif line.startswith("GENIE_RESULT "):
            res = json.loads(line[len("GENIE_RESULT "):])
            if "query" in res:
                run.queries.append(GenieQuery(res["status"], res["tokens"], res["text"]))
                state["t0"], state["tokens"] = time.perf_counter(), 0
            else:
                for k, v in res.items():
                    setattr(run, k, v)

    child = run_child("qwen_ondevice.qnn.genie_run:_child", spec, timeout=timeout, cwd=cwd, env=env, on_line=on_line)
    run.exit, run.stderr = child.status, child.stderr
    return run


def _child() -> None:
    """The child: ctypes calls into libGenie (spec JSON on stdin); prints ``GENIE_LOG <level>
    <json string>`` per log line and ``GENIE_RESULT {json}`` after each step, then leaves with
    ``os._exit`` (skipping the QNN libraries' exit-time destructors)."""
    spec = read_spec()
    lib = ctypes.CDLL(spec["lib"], mode=ctypes.RTLD_GLOBAL)
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(1 << 16)

    def emit(kind: str, payload: str) -> None:
        sys.stdout.write(f"{kind} {payload}\n")
        sys.stdout.flush()

    def report(**kw) -> None:
        emit("GENIE_RESULT", json.dumps(kw))

    # void (*)(GenieLog_Handle_t, const char* fmt, GenieLog_Level_t, uint64_t timestamp, va_list)
    LogCB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p)

    def on_log(handle, fmt, level, timestamp, args):
        libc.vsnprintf(buf, len(buf), fmt, args)
        emit("GENIE_LOG", f"{int(level)} " + json.dumps(buf.value.decode("utf-8", "replace").rstrip()))

    log_cb = LogCB(on_log)
    log = ctypes.c_void_p()
    lib.GenieLog_create.argtypes = [ctypes.c_void_p, LogCB, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.GenieLog_create(None, log_cb, LOG_VERBOSE, ctypes.byref(log))
    cfg = ctypes.c_void_p()
    lib.GenieDialogConfig_createFromJson.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    st = lib.GenieDialogConfig_createFromJson(spec["config"].encode(), ctypes.byref(cfg))
    report(config_status=int(st))
    if st == 0 and spec["create"]:
        lib.GenieDialogConfig_bindLogger.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.GenieDialogConfig_bindLogger(cfg, log)
        dialog = ctypes.c_void_p()
        lib.GenieDialog_create.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        st = lib.GenieDialog_create(cfg, ctypes.byref(dialog))
        report(dialog_status=int(st))
        if st == 0:
            lib.GenieDialog_setMaxNumTokens.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
            lib.GenieDialog_reset.argtypes = [ctypes.c_void_p]
            TokCB = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
            TextCB = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p)
            lib.GenieDialog_tokenQuery.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32,
                                                   ctypes.c_int, TokCB, ctypes.c_void_p]
            lib.GenieDialog_query.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, TextCB, ctypes.c_void_p]
            for k, q in enumerate(spec["queries"]):
                if k:
                    lib.GenieDialog_reset(dialog)
                lib.GenieDialog_setMaxNumTokens(dialog, spec["max_new_tokens"])
                tokens, pieces = [], []
                if "ids" in q:
                    def on_tokens(ptr, n, code, user):
                        tokens.extend(int(ptr[i]) for i in range(n))
                        for _ in range(n):
                            emit("GENIE_TOKEN", "")

                    cb = TokCB(on_tokens)
                    ids = (ctypes.c_uint32 * len(q["ids"]))(*q["ids"])
                    qs = lib.GenieDialog_tokenQuery(dialog, ids, len(q["ids"]), 0, cb, None)
                else:
                    def on_text(text, code, user):
                        if text:
                            pieces.append(text)
                            emit("GENIE_TOKEN", "")

                    cb = TextCB(on_text)
                    qs = lib.GenieDialog_query(dialog, q["text"].encode(), 0, cb, None)
                report(query=k, status=int(qs), tokens=tokens, text=b"".join(pieces).decode("utf-8", "replace"))
            lib.GenieDialog_free.argtypes = [ctypes.c_void_p]
            lib.GenieDialog_free(dialog)
    leave()
