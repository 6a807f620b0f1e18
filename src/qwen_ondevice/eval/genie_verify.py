"""``qwen-ondevice verify BUNDLE --genie``: Genie itself runs the bundle on this host.

Rung 6 of the verification ladder. The x86_64 HTP simulator cannot create a weight-shared
context, so the bundle's *non-shared twin* is built in a temporary folder: each graph of each
part compiled into a context binary of its own, with the bundle's HTP optimization level, and
renamed exactly as the export renamed the shipped graphs. Genie (``libGenie.so`` of the
onnxruntime-qnn wheel, in a child process, its log captured at the verbose level) then runs the
bundle's own ``genie_config.json`` with only ``ctx-bins`` swapped for the twin's and a greedy
sampler (``top-k`` 1), on a short chat prompt rendered with the bundle's chat template:

1. as token ids (``GenieDialog_tokenQuery``): Genie's greedy tokens must equal the project's
   runtime's greedy tokens for the same ids (the ``qnn-htp`` backend: the same binaries on the
   same simulator), which proves the part order, every boundary and the KV handling;
2. as text (``GenieDialog_query``, what ``genie-t2t-run -p`` sends): Genie's text must equal the
   decoded greedy tokens, which proves that Genie's tokenization of the templated prompt, with
   the config's ``bos-token``, gives the chat template's token ids.

With a verify graph the bundle's lookahead dialog (``genie_config_lade.json``) runs on the twin
too and must give plain greedy decoding's tokens. Where ``qwen-ondevice genie-spd`` wrote a
draft-model dialog (``genie_config_spd.json``), it runs with the draft's twin (the bundle's own
twin when the draft is the bundle) on the text query (spd refuses token ids) and its text is
reported beside plain greedy decoding's, without deciding the verdict: Genie 1.21's spd is not
lossless.

It passes when both queries succeed, the tokens and text agree, and Genie's log holds none of
:data:`BAD_LOG` and no error line. It also loads the real weight-shared bundle in Genie as far as
the simulator lets it and checks Genie's "Graphs loaded ((AR-n, CL-x): #splits)" line: every AR
at the bundle's CL with one split per part.
"""

from __future__ import annotations

import ast
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qwen_ondevice.core.bundle import MANIFEST, read_manifest
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.progress import log
from qwen_ondevice.qnn.compile import check_boundaries, compile_in_child
from qwen_ondevice.qnn.genie import GENIE_CONFIG, GENIE_LADE_CONFIG, GENIE_SPD_CONFIG
from qwen_ondevice.qnn.genie_run import genie_library, run_genie
from qwen_ondevice.qnn.graph_names import parse_graph_name
from qwen_ondevice.qnn.prepare import name_graphs, partition_name, wrapper_name
from qwen_ondevice.runtime.open_model import open_bundle_runtime

#: Genie log messages that mean the bundle is wrong for Genie even when the dialog starts.
BAD_LOG = ("Unconnected input tensor", "does not follow the expected split naming",
           "Non-identical quantization parameters", "validation error")
#: Genie's summary of the graphs it sorted into (AR, CL) variants and splits (libGenie's qnn-htp).
GRAPHS_LOADED = "Graphs loaded ((AR-n, CL-x): #splits):"
#: Tokens generated per query (each a token-generator call on the simulator).
DEFAULT_NEW_TOKENS = 8


def build_twin(root: Path, manifest, work: Path) -> list[Path]:
    """Compile every (part, AR) graph of the bundle into a context binary of its own in ``work``,
    renamed as the bundle's graphs are; returns the .bin paths in ``ctx-bins`` order (part by
    part, prompt processor first) after checking that their boundaries connect.

    Raises:
        UserError: a graph could not be compiled or renamed (CompileError), or the twin's parts
            do not join.
    """
    qnn = manifest.data["qnn"]
    level = int(qnn.get("htp_optimization", 3))
    N, CL = len(manifest.parts), manifest.context_length
    bins, joins = [], []
    for part in manifest.parts:
        graphs = {}
        for ar in sorted((int(a) for a in part["graphs"]), reverse=True):
            folder = work / f"{part['name']}.ar{ar}"
            folder.mkdir(parents=True)
            wrapper = folder / wrapper_name(part["name"], ar)
            t0 = time.perf_counter()
            result, peak, stderr = compile_in_child({"chipset": qnn["chipset"], "share": False, "optimization": level,
                                                "graphs": [[ar, str(root / part["graphs"][str(ar)]["file"]), str(wrapper)]]})
            if not result["ok"]:
                raise UserError(f"{part['name']} AR-{ar}: the non-shared twin could not be compiled: {result['error'][:400]}")
            (b,) = folder.glob("*.bin")
            info = {"qnn_graph": partition_name(wrapper)}
            name_graphs(b, {ar: (wrapper, info)}, CL, int(part["index"]), N)
            graphs[ar] = (b, info["qnn_graph"])
            bins.append(b)
            log(f"[genie] twin {part['name']} AR-{ar}: {b.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
        joins.append((part["name"], graphs))
    check_boundaries(joins)
    return bins


def graphs_loaded(run) -> dict | None:
    """The last "Graphs loaded" line of a Genie run as {(AR, CL): splits} (None when absent)."""
    lines = [m for m in run.messages() if GRAPHS_LOADED in m]
    if not lines:
        return None
    return {tuple(k): v for k, v in ast.literal_eval(lines[-1].split(GRAPHS_LOADED, 1)[1].strip()).items()}


def prompt_graph_ars(run) -> list[int]:
    """The ARs of the graphs Genie ran for the first query's prompt, in order: its log's
    "Executing graph 0 - <name>" lines (the first part of each call) up to the first token it
    generates; [] when the log has none."""
    ars: list[int] = []
    started = False
    for _, msg in run.log:
        if msg.startswith(("Entering GenieDialog_tokenQuery", "Entering GenieDialog_query")):
            if started:
                break
            started = True
        elif started and msg.startswith("Executing graph 0 - "):
            ar = parse_graph_name(msg[len("Executing graph 0 - "):].strip())[0]
            ars.append(ar)
        elif started and msg.startswith("input-logits"):  # the prompt's logits: generation follows
            break
    return ars


def log_problems(run) -> list[str]:
    """The lines of Genie's log that make a run fail: :data:`BAD_LOG` messages and error lines."""
    bad = [m for lv, m in run.log if any(b in m for b in BAD_LOG)]
    return bad + [m for lv, m in run.log if lv == "error" and m not in bad]


#: The most lookahead tokens compared with plain greedy decoding (the runtime decodes as many).
LADE_MAX_COMPARED = 32


def draft_twin(root: Path, manifest, spd: dict, bins: list[Path], work: Path) -> list[Path]:
    """The twin ``ctx-bins`` of the draft engine of the spd dialog ``spd`` (paths relative to
    ``root``): the bundle's own twin ``bins`` when the draft is the bundle, else the draft
    bundle's twin, built in ``work``.

    Raises:
        UserError: the draft's binaries are in no bundle folder, or its twin cannot be built.
    """
    draft = next(e for e in spd["dialog"]["engine"] if e["role"] == "draft")
    paths = [(root / b).resolve() for b in draft["model"]["binary"]["ctx-bins"]]
    own = [(root / p["bin"]).resolve() for p in manifest.data["qnn"]["parts"]]
    if paths == own:
        return bins
    folder = paths[0].parent
    while not (folder / MANIFEST).is_file():
        if folder == folder.parent:
            raise UserError(f"{GENIE_SPD_CONFIG}: the draft's {paths[0]} is in no bundle folder")
        folder = folder.parent
    log(f"[genie] building the draft's non-shared twin ({folder})")
    return build_twin(folder, read_manifest(folder), work)


def reference_tokens(rt, ids: list[int], n: int) -> list[int]:
    """The greedy tokens (argmax, no stop) of the runtime ``rt`` after ``ids``."""
    logits, out = rt.engine.prefill(ids), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if len(out) < n:
            logits = rt.engine.feed([out[-1]])
    return out


def verify_genie(root: Path, prompt: str, new_tokens: int = DEFAULT_NEW_TOKENS, timeout: float = 3600.0) -> dict:
    """Run the bundle's non-shared twin under Genie and compare it with the project's runtime
    (see the module docstring); returns the report (``ok`` says whether it passed).

    Raises:
        UserError: the bundle has no context binaries, or libGenie.so is not installed.
    """
    if genie_library() is None:
        raise UserError("verify --genie needs libGenie.so from the onnxruntime-qnn wheel (Linux x86_64)")
    # one open (one sha256 pass over the bundle): the reference runtime, its manifest and tokenizer
    rt = open_bundle_runtime(root, "qnn-htp")  # refuses a bundle without context binaries
    m, tok = rt.engine.backend.manifest, rt.tokenizer
    messages = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages)
    text = tok.chat_text(messages)
    config = json.loads((root / GENIE_CONFIG).read_text())
    report = {"bundle": str(root), "prompt_tokens": len(ids), "new_tokens": new_tokens}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwen-genie-twin-") as tmp:
        log(f"[genie] building the non-shared twin of {root} (each graph in its own context binary)")
        bins = build_twin(root, m, Path(tmp))
        report["twin_seconds"] = round(time.perf_counter() - t0, 1)
        twin = copy.deepcopy(config)
        twin["dialog"]["engine"]["model"]["binary"]["ctx-bins"] = [str(b) for b in bins]
        twin["dialog"]["sampler"] = {"version": 1, "seed": 42, "temp": 1.0, "top-k": 1, "top-p": 1.0, "greedy": True}
        log(f"[genie] Genie on the twin: a {len(ids)}-token chat prompt as token ids, then as text, {new_tokens} greedy tokens each")
        t1 = time.perf_counter()
        run = run_genie(twin, root, [{"ids": ids}, {"text": text}], max_new_tokens=new_tokens, timeout=timeout)
        report["genie_seconds"] = round(time.perf_counter() - t1, 1)
        lade, lrun = None, None
        if (root / GENIE_LADE_CONFIG).is_file():  # lookahead through the verify graph
            lade = json.loads((root / GENIE_LADE_CONFIG).read_text())
            lade["dialog"]["engine"], lade["dialog"]["sampler"] = twin["dialog"]["engine"], twin["dialog"]["sampler"]
            log(f"[genie] Genie's lookahead dialog ({GENIE_LADE_CONFIG}) on the twin, {new_tokens} greedy tokens")
            lrun = run_genie(lade, root, [{"ids": ids}], max_new_tokens=new_tokens, timeout=timeout)
        spd, srun = None, None
        if (root / GENIE_SPD_CONFIG).is_file():  # Genie's draft-model dialog, reported only
            spd = json.loads((root / GENIE_SPD_CONFIG).read_text())
            dbins = draft_twin(root, m, spd, bins, Path(tmp) / "draft")
            for e in spd["dialog"]["engine"]:
                e["model"]["binary"]["ctx-bins"] = [str(b) for b in (bins if e["role"] == "target" else dbins)]
            spd["dialog"]["sampler"] = twin["dialog"]["sampler"]
            log(f"[genie] Genie's draft-model dialog ({GENIE_SPD_CONFIG}) on the twins, {new_tokens} greedy tokens")
            # spd refuses token-id queries (GenieDialog_tokenQuery status -6 in Genie 1.21): the text query
            srun = run_genie(spd, root, [{"text": text}], max_new_tokens=new_tokens, timeout=timeout)
    # lookahead and spd do not stop at max_new_tokens (they emit whole accepted runs, and Genie 1.21
    # goes on to an end token): their tokens are compared as far as they go, up to LADE_MAX_COMPARED
    lq = (lrun.queries + [None])[0] if lrun is not None else None
    sq = (srun.queries + [None])[0] if srun is not None else None
    n_ref = max(new_tokens, min(len(lq.tokens), LADE_MAX_COMPARED)) if lq is not None and lq.tokens else new_tokens
    if sq is not None:  # a text query: compared with as many decoded tokens as it may hold
        n_ref = max(n_ref, min(LADE_MAX_COMPARED, m.context_length - len(ids)))
    log("[genie] the project's runtime (qnn-htp) on the same ids")
    t2 = time.perf_counter()
    ref_long = reference_tokens(rt, ids, n_ref)
    ref = ref_long[:new_tokens]
    report["reference_seconds"] = round(time.perf_counter() - t2, 1)
    eos = config["dialog"]["context"]["eos-token"]
    stop = set(eos if isinstance(eos, list) else [eos])

    def cut(tokens):  # Genie stops at an end token and does not emit it; compare up to the first one
        return next((tokens[:k] for k, t in enumerate(tokens) if t in stop), tokens)

    ref_cut = cut(ref)
    q_ids, q_text = (run.queries + [None, None])[:2]
    loaded = graphs_loaded(run)
    want = {(ar, m.context_length): len(m.parts) for ar in m.ar_lengths}
    report["twin"] = {
        **run.to_dict(), "graphs_loaded": {f"{k[0]},{k[1]}": v for k, v in (loaded or {}).items()},
        "reference_tokens": ref, "tokens_equal": q_ids is not None and q_ids.tokens == ref_cut,
        "text_equal": q_text is not None and q_text.text == tok.decode(ref_cut),
        "reference_text": tok.decode(ref_cut), "log_problems": log_problems(run)[:10],
        "prompt_graphs": prompt_graph_ars(run), "reference_prompt_graphs": rt.engine.prompt_ars(len(ids)),
    }
    t = report["twin"]
    t["prompt_graphs_equal"] = t["prompt_graphs"] == t["reference_prompt_graphs"]
    if lrun is not None:  # lookahead must give plain greedy decoding's tokens
        got = (lq.tokens or [])[:n_ref] if lq is not None else None
        report["lade"] = {"config_status": lrun.config_status, "dialog_status": lrun.dialog_status,
                          "settings": lade["dialog"]["lade"], "tokens": got, "reference_tokens": cut(ref_long),
                          "query_status": lq.status if lq is not None else None,
                          "tokens_equal": lq is not None and len(got) >= len(ref_cut) and got == cut(ref_long)[:len(got)],
                          "log_problems": log_problems(lrun)[:10]}
    if srun is not None:  # reported beside plain greedy decoding; not part of the verdict
        got = sq.text if sq is not None else None
        ref_text = tok.decode(cut(ref_long))
        report["spd"] = {"config_status": srun.config_status, "dialog_status": srun.dialog_status,
                         "settings": spd["dialog"]["spd"], "text": got, "reference_text": ref_text,
                         "query_status": sq.status if sq is not None else None,
                         "text_equal": bool(got) and len(got) >= len(tok.decode(ref_cut)) and ref_text.startswith(got),
                         "log_problems": log_problems(srun)[:10]}
    shared = run_genie(config, root, create_dialog=True, timeout=timeout)
    loaded_shared = graphs_loaded(shared)
    report["shared"] = {"config_status": shared.config_status, "dialog_status": shared.dialog_status, "exit": shared.exit,
                        "graphs_loaded": {f"{k[0]},{k[1]}": v for k, v in (loaded_shared or {}).items()},
                        "graphs_ok": loaded_shared == want, "log_problems": log_problems(shared)[:10],
                        "refusal": next((msg.strip() for msg in shared.messages("error") if "Shared weights" in msg), "")}
    report["expected_graphs"] = {f"{k[0]},{k[1]}": v for k, v in want.items()}
    report["ok"] = bool(run.config_status == 0 and run.dialog_status == 0 and q_ids and q_ids.status == 0
                        and q_text and q_text.status == 0 and t["tokens_equal"] and t["text_equal"]
                        and t["prompt_graphs_equal"] and not t["log_problems"] and loaded == want and loaded_shared == want
                        and report.get("lade", {"tokens_equal": True})["tokens_equal"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _ars(ars: list[int]) -> str:
    return ", ".join(f"AR-{a}" for a in ars) or "none found"


def format_genie_report(r: dict) -> str:
    t, s = r["twin"], r["shared"]
    q = (t["queries"] + [{}, {}])[:2]
    lines = [
        f"Genie (libGenie.so of onnxruntime-qnn) on {r['bundle']}: {r['prompt_tokens']}-token chat prompt, "
        f"{r['new_tokens']} greedy tokens",
        f"  non-shared twin: config {t['config_status']}, dialog {t['dialog_status']}, token query {q[0].get('status')}, "
        f"text query {q[1].get('status')}; graphs loaded {t['graphs_loaded']} (expected {r['expected_graphs']})",
        f"  prompt graphs {_ars(t['prompt_graphs'])} in Genie vs {_ars(t['reference_prompt_graphs'])} in the runtime: "
        + ("equal" if t["prompt_graphs_equal"] else "DIFFER"),
        f"  Genie tokens {q[0].get('tokens')} vs qnn-htp {t['reference_tokens']}: " + ("equal" if t["tokens_equal"] else "DIFFER"),
        f"  Genie text {q[1].get('text')!r} vs decoded {t['reference_text']!r}: " + ("equal" if t["text_equal"] else "DIFFER"),
        "  Genie log: " + ("no unconnected tensor, naming warning, encoding mismatch or error"
                           if not t["log_problems"] else "; ".join(t["log_problems"][:4])),
        *([f"  lookahead dialog {r['lade']['settings']}: tokens {r['lade']['tokens']} "
           + ("equal plain greedy decoding" if r["lade"]["tokens_equal"] else "DIFFER from plain greedy decoding")]
          if "lade" in r else []),
        *([f"  draft-model dialog {r['spd']['settings']} (reported only; not lossless in Genie 1.21): text "
           f"{r['spd']['text']!r} " + ("equals" if r["spd"]["text_equal"] else "differs from")
           + " plain greedy decoding's"] if "spd" in r else []),
        f"  weight-shared bundle: config {s['config_status']}, dialog {s['dialog_status']} (exit {s['exit']}); "
        f"graphs loaded {s['graphs_loaded']} " + ("as expected" if s["graphs_ok"] else "NOT as expected")
        + (f"; the simulator stops there: {s['refusal'][:160]}" if s["refusal"] else ""),
        ("PASS" if r["ok"] else "FAIL") + f" (twin {r['twin_seconds']} s, Genie {r['genie_seconds']} s, qnn-htp "
        f"{r['reference_seconds']} s)",
    ]
    return "\n".join(lines)
