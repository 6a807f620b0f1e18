"""``report.json``: the bundle's accuracy against the float model, its sizes and bytes per token."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from qwen_ondevice.core.bundle import Manifest, bytes_per_token
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.progress import log
from qwen_ondevice.core.texts import default_evaluation_text, text_token_ids
from qwen_ondevice.core.tokenizer import Tokenizer
from qwen_ondevice.eval.evaluate import evaluate_engines, reference_engine
from qwen_ondevice.eval.fidelity import measure_fidelity
from qwen_ondevice.export.footprint import fidelity_reference_fits
from qwen_ondevice.runtime.backends.ort_backend import OrtBackend
from qwen_ondevice.runtime.engine import Engine


def write_report(out: Path, manifest: dict, eval_tokens: int, window: int, fidelity_prompts: int = 0,
                 fidelity_tokens: int = 128) -> dict:
    """Evaluate the bundle in ``out`` (ORT CPU) against its float source on the shipped held-out
    text and, with ``fidelity_prompts``, by free-running generation (:mod:`qwen_ondevice.eval.fidelity`);
    write ``out/report.json`` and print the summary; returns the accuracy dict.

    The fidelity measure decodes with the whole float model in memory (torch, float32): it is
    skipped, with the reason in the report, when those weights exceed half of the memory
    available now (Qwen2-7B: 30 GB); ``qwen-ondevice evaluate BUNDLE --fidelity`` runs it on a
    machine that holds them.

    The bundle is opened from the in-memory ``manifest`` (the file is written after the report,
    so that it can list report.json's sha256)."""
    m = Manifest(out, manifest)
    window = min(window, m.context_length)
    tokens = max(eval_tokens // window, 1) * window
    gen = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").exists() else {}
    tok = Tokenizer.from_folder(out, m.config, gen)
    engine = Engine(OrtBackend(m), prompt_length=max(m.ar_lengths), mask_value=float(manifest["mask_value"]))
    text = default_evaluation_text()
    ids = text_token_ids(tok, text, tokens, "evaluation")
    ref, _ = reference_engine(manifest["model"]["source"], window)
    log(f"[report] scoring {tokens} held-out tokens in windows of {window} against the float model")
    acc = evaluate_engines(engine, ref, ids, window, text.name)
    del ref
    log(f"[report] {acc.format()}")
    fidelity = _fidelity(engine, tok, m, fidelity_prompts, fidelity_tokens) if fidelity_prompts > 0 else None
    report = {
        "precision": manifest["precision"],
        "accuracy": {k: v for k, v in acc.to_dict().items() if k != "seconds"},
        "reference": {"model": manifest["model"]["source"], "backend": "torch", "dtype": "float32"},
        "bundle_backend": "ort-cpu",
        "sizes": bytes_per_token(m),
        "mixed_precision": (manifest.get("quantization") or {}).get("mixed_precision"),
        **({"fidelity": fidelity} if fidelity is not None else {}),
    }
    write_json(out / "report.json", report, indent=1)
    return {"perplexity_ratio": acc.perplexity_ratio, "top1_agreement": acc.top1_agreement, "seconds": acc.seconds}


def _fidelity(engine, tok, m: Manifest, prompts: int, max_new_tokens: int) -> dict:
    """The fidelity block of report.json: :func:`measure_fidelity` without its per-prompt rows,
    or ``{"skipped": reason}`` when the float model does not fit in memory or no prompt fits CL."""
    float_bytes = 4 * m.config.parameter_count()
    available = psutil.virtual_memory().available
    if not fidelity_reference_fits(m.config, available):
        reason = (f"the float reference needs {float_bytes / 1e9:.1f} GB in float32, more than half of the "
                  f"{available / 1e9:.1f} GB available; run `qwen-ondevice evaluate BUNDLE --fidelity` on a bigger machine")
        log(f"[report] generation fidelity skipped: {reason}")
        return {"skipped": reason}
    r = measure_fidelity(engine, tok, m.data["model"]["source"], prompts, max_new_tokens)
    if r.prompts == 0:
        reason = f"none of the {r.skipped} prompts fits the context length {engine.context_length}"
        log(f"[report] generation fidelity skipped: {reason}")
        return {"skipped": reason}
    log(f"[report] {r.format()}")
    return r.to_dict(rows=False)
