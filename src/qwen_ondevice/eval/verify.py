"""``qwen-ondevice verify BUNDLE``: do the QNN context binaries compute what the QDQ parts compute?

Rung 4 of the verification ladder (docs/verification.md). A short real chat prompt goes through
the ``ort-cpu`` engine (the QDQ ONNX parts on ONNX Runtime's CPU EP); the inputs each part got in
its last AR-128 call (the prompt processor) and in one AR-1 call (the token generator) are
captured with the outputs it returned. Each part's context binary then runs on the HTP (the
simulator on x86_64) with those very quantized inputs, and every output is compared after
dequantizing both with the manifest's encodings (over the rows of the call's real tokens: the host
discards the padded ones): cosine similarity and max abs difference, and
for the last part whether the argmax token agrees on the row the runtime samples from (the last
valid row of each call; the other rows are reported too, with the CPU's margin where they differ).

Each part runs in a child process: a QNN crash cannot take the command down, and each part gets
a fresh QNN state (on x86_64 the part is prepared again there and must match the shipped .bin:
byte-identical, or the same size with a few hundred bytes of graph description different; see
:func:`qwen_ondevice.qnn.context.open_part_context`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qwen_ondevice.core.bundle import read_manifest
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.progress import log
from qwen_ondevice.qnn.child import leave, read_spec, run_child
from qwen_ondevice.qnn.chipsets import CHIPSETS, check_chipset_option
from qwen_ondevice.qnn.context import open_part_context
from qwen_ondevice.runtime.backends.ort_backend import DTYPES, OrtBackend
from qwen_ondevice.runtime.backends.qnn_backend import qnn_section
from qwen_ondevice.runtime.open_model import open_bundle_runtime

MIN_COSINE = 0.999
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def capture_inputs(root: Path, prompt: str = DEFAULT_PROMPT) -> tuple[dict, list[int]]:
    """Run the ort-cpu engine over the chat-templated ``prompt`` plus one generated token.

    Returns ({(part_index, ar): {"feeds", "outputs", "n_valid", "seconds"}}, prompt ids); for each
    part and AR the last call is kept (for AR-128 the one that saw the longest past).
    """
    rt = open_bundle_runtime(root, "ort-cpu")
    backend: OrtBackend = rt.engine.backend
    backend.trim_past = False  # the recorded feeds go to the context binaries: the full static past
    calls: dict = {}
    state = {"n_valid": None}
    forward, session = backend.forward, backend.session

    def recording_forward(input_ids, attention_mask, cos, sin, cache, n_past, n_valid, last_only=False):
        state["n_valid"] = n_valid
        return forward(input_ids, attention_mask, cos, sin, cache, n_past, n_valid, last_only)

    def recording_session(part_index, ar):
        return _Recorder(session(part_index, ar), (part_index, ar), calls, state)

    backend.forward, backend.session = recording_forward, recording_session
    ids = rt.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    logits = rt.engine.prefill(ids)
    rt.engine.feed([int(np.argmax(logits))])
    return calls, ids


class _Recorder:
    """Wraps an ONNX Runtime session: records the (copied) feeds and outputs of each run."""

    def __init__(self, sess, key, calls: dict, state: dict):
        self.sess, self.key, self.calls, self.state = sess, key, calls, state

    def run(self, names, feeds):
        names = names or [o.name for o in self.sess.get_outputs()]
        t0 = time.perf_counter()
        outs = self.sess.run(names, feeds)
        seconds = time.perf_counter() - t0
        self.calls[self.key] = {"feeds": {k: np.array(v, copy=True) for k, v in feeds.items()},
                                "outputs": {n: np.array(o, copy=True) for n, o in zip(names, outs)},
                                "n_valid": self.state["n_valid"], "seconds": seconds}
        return outs


def valid_rows(name: str, x: np.ndarray, n_valid: int) -> np.ndarray:
    """The entries of output ``name`` that belong to the call's ``n_valid`` real tokens (the host
    discards the padded rows): the token axis is 3 for ``past_key_*_out`` (KVH, 1, D, AR), 2 for
    ``past_value_*_out`` (KVH, 1, AR, D), 1 for hidden states and logits (1, AR, .)."""
    axis = 3 if name.startswith("past_key_") else 2 if name.startswith("past_value_") else 1
    return np.take(x, np.arange(n_valid), axis=axis)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine similarity and max abs difference of two float arrays (cosine 1 when both are 0)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = 1.0 if na == 0 and nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0
    return cos, float(np.abs(a - b).max()) if a.size else 0.0


def _argmax_report(cpu: np.ndarray, htp: np.ndarray, n_valid: int) -> dict:
    """Argmax agreement of the valid rows (AR, V). The row the runtime samples the next token
    from is the last valid one (the others of a prompt-processor call are discarded); it decides
    pass/fail. Disagreeing rows are listed with the CPU's margin between its top-1 and the HTP's
    choice (a near-tie flips under any small difference)."""
    a, b = cpu[:n_valid].argmax(-1), htp[:n_valid].argmax(-1)
    bad = [{"row": int(r), "cpu": int(a[r]), "htp": int(b[r]), "cpu_margin": float(cpu[r, a[r]] - cpu[r, b[r]])}
           for r in np.nonzero(a != b)[0]]
    last = n_valid - 1
    # A disagreement is a near-tie, not a failure, when the CPU's own margin between the two
    # tokens is within twice the row's largest logit difference: the argmax is then not
    # determined at the precision either side computes with.
    tie = bool(a[last] != b[last] and (cpu[last, a[last]] - cpu[last, b[last]]) <= 2 * np.abs(cpu[last] - htp[last]).max())
    return {"rows": int(n_valid), "rows_agree": int((a == b).sum()), "sampled_row_agrees": bool(a[-1] == b[-1]),
            "near_tie": tie, "token": int(b[-1]), "disagreeing": bad}


def verify_bundle(root: Path, chipset: str | None = None, prompt: str = DEFAULT_PROMPT, timeout: float | None = None) -> dict:
    """Compare every part's context binary with the ORT CPU run of its QDQ graphs.

    Returns a report: ``rows`` (part, AR, output, cosine, max abs diff), ``argmax`` of the last
    part per AR, simulator and CPU seconds per call, ``ok``.

    Raises:
        UserError: the bundle has no context binaries (or none for ``chipset``), or a part could
            not be run on the HTP (its message says which and why).
    """
    m = read_manifest(root)
    qnn = qnn_section(m, chipset)
    check_chipset_option(qnn["chipset"], m.precision)
    encodings = OrtBackend(m).encodings
    log(f"[verify] ort-cpu run of the QDQ parts over a {len(prompt)}-character prompt")
    calls, prompt_ids = capture_inputs(root, prompt)
    rows, argmax, timings = [], {}, []
    t_all = time.perf_counter()
    for i, part in enumerate(m.parts):
        keys = sorted((k for k in calls if k[0] == i), key=lambda k: -k[1])
        with tempfile.TemporaryDirectory(prefix="qwen-verify-") as tmp:
            feeds = {f"{ar}:{n}": v for (_, ar) in keys for n, v in calls[(i, ar)]["feeds"].items()}
            np.savez(Path(tmp) / "feeds.npz", **feeds)
            spec = {"root": str(root.resolve()), "part": i, "ars": [ar for _, ar in keys], "tmp": tmp}
            log(f"[verify] {part['name']}: AR-{', AR-'.join(str(ar) for _, ar in keys)} on the HTP ({qnn['chipset']})")
            result = _run_child(spec, timeout)
            if not result.get("ok"):
                raise UserError(f"{part['name']}: could not run on the HTP: {result.get('error', 'no result')}")
            with np.load(Path(tmp) / "outputs.npz") as z:
                htp = {k: z[k] for k in z.files}
        for _, ar in keys:
            call = calls[(i, ar)]
            timings.append({"part": part["name"], "ar": ar, "htp_seconds": result["seconds"][str(ar)],
                            "cpu_seconds": round(call["seconds"], 4), "how": result["how"]})
            n_valid = call["n_valid"] if ar != 1 else 1
            for name, ref in call["outputs"].items():
                got = htp[f"{ar}:{name}"]
                enc = encodings.get(f"{part['name']}:{name}")
                deq = (lambda x: enc.dequantize(x)) if enc is not None else (lambda x: x.astype(np.float32))
                cos, diff = compare(valid_rows(name, deq(ref), n_valid), valid_rows(name, deq(got), n_valid))
                rows.append({"part": part["name"], "ar": ar, "output": name, "cosine": cos, "max_abs_diff": diff,
                             # the same difference in steps of the output's encoding (1: a rounding flip)
                             "max_steps": round(diff / enc.scale, 2) if enc is not None else None,
                             "ok": cos >= MIN_COSINE})
                if name == "logits":
                    argmax[ar] = _argmax_report(deq(ref)[0], deq(got)[0], n_valid)
    ok = all(r["ok"] for r in rows) and all(v["sampled_row_agrees"] or v["near_tie"] for v in argmax.values())
    return {"bundle": str(root), "chipset": qnn["chipset"], "prompt_tokens": len(prompt_ids), "rows": rows,
            "argmax": argmax, "timings": timings, "seconds": round(time.perf_counter() - t_all, 2), "ok": ok,
            "min_cosine": MIN_COSINE}


def _run_child(spec: dict, timeout: float | None) -> dict:
    run = run_child("qwen_ondevice.eval.verify:_child", spec, timeout=timeout)
    if run.status == "timeout":
        return {"ok": False, "error": f"timed out after {timeout} s"}
    rpath = Path(spec["tmp"]) / "result.json"
    if not rpath.exists():
        tail = run.stderr.strip().splitlines()[-3:]
        return {"ok": False, "error": f"the HTP process died (exit status {run.status}): {' | '.join(tail)}"}
    return json.loads(rpath.read_text())


def _child() -> None:
    """Child process: run one part's context binary on the captured feeds (spec JSON on stdin)."""
    spec = read_spec()
    tmp = Path(spec["tmp"])
    try:
        root = Path(spec["root"])
        m = read_manifest(root, verify=False)
        qnn = qnn_section(m)
        i = spec["part"]
        part, qpart = m.parts[i], qnn["parts"][i]
        sha = m.data["files"].get(qpart["bin"], {}).get("sha256")
        sessions, how = open_part_context(root, part, qpart, CHIPSETS[qnn["chipset"]], sha, tmp / "prepare", strict=True,
                                          context_length=m.context_length, num_parts=len(m.parts))
        feeds = np.load(tmp / "feeds.npz")
        outputs, seconds = {}, {}
        for ar in spec["ars"]:
            g = part["graphs"][str(ar)]
            f = {io["name"]: feeds[f"{ar}:{io['name']}"].astype(DTYPES[io["dtype"]], copy=False) for io in g["inputs"]}
            names = [o["name"] for o in g["outputs"]]
            t0 = time.perf_counter()
            outs = sessions[ar].run(names, f)
            seconds[str(ar)] = round(time.perf_counter() - t0, 4)
            outputs.update({f"{ar}:{n}": o for n, o in zip(names, outs)})
        np.savez(tmp / "outputs.npz", **outputs)
        result = {"ok": True, "seconds": seconds, "how": how}
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:800]}"}
    (tmp / "result.json").write_text(json.dumps(result))
    leave()


def format_report(r: dict) -> str:
    lines = [f"verify {r['bundle']} on {r['chipset']} (HTP vs ONNX Runtime CPU, same quantized inputs; "
             f"prompt {r['prompt_tokens']} tokens; pass: cosine >= {r['min_cosine']} and the next-token argmax equal)",
             f"{'part':<14} {'graph':<7} {'output':<22} {'cosine':>10} {'max|diff|':>11} {'steps':>7}  ok"]
    for row in r["rows"]:
        steps = f"{row['max_steps']:>7.0f}" if row.get("max_steps") is not None else f"{'':>7}"
        lines.append(f"{row['part']:<14} AR-{row['ar']:<4} {row['output']:<22} {row['cosine']:>10.6f} {row['max_abs_diff']:>11.5g} {steps}  "
                     + ("yes" if row["ok"] else "NO"))
    for ar, a in sorted(r["argmax"].items(), key=lambda kv: -int(kv[0])):
        lines.append(f"last part AR-{ar}: next-token argmax (last valid row) " + ("agrees" if a["sampled_row_agrees"] else "differs within a near-tie" if a["near_tie"] else "DIFFERS")
                     + f" (token {a['token']}); all valid rows: {a['rows_agree']}/{a['rows']} agree"
                     + "".join(f"; row {d['row']}: cpu {d['cpu']} htp {d['htp']} (cpu margin {d['cpu_margin']:.4f})" for d in a["disagreeing"][:4]))
    for t in r["timings"]:
        lines.append(f"{t['part']:<14} AR-{t['ar']:<4} HTP {t['htp_seconds']:.3f} s per call, ORT CPU {t['cpu_seconds']:.3f} s ({t['how']})")
    lines.append(("PASS" if r["ok"] else "FAIL") + f" ({r['seconds']:.1f} s on the HTP side)")
    return "\n".join(lines)

