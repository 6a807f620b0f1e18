"""``report.json``: the bundle's accuracy against the float model, its sizes and bytes per token."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_ondevice.core.bundle import Manifest, bytes_per_token
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.progress import log


def write_report(out: Path, manifest: dict, eval_tokens: int, window: int) -> dict:
    """Evaluate the bundle in ``out`` (ORT CPU) against its float source on the shipped held-out
    text, write ``out/report.json`` and print the summary; returns the accuracy dict.

    The bundle is opened from the in-memory ``manifest`` (the file is written after the report,
    so that it can list report.json's sha256)."""
    from qwen_ondevice.core.tokenizer import Tokenizer
    from qwen_ondevice.eval.evaluate import evaluate_engines, reference_engine
    from qwen_ondevice.core.texts import default_evaluation_text, text_token_ids
    from qwen_ondevice.runtime.backends.ort_backend import OrtBackend
    from qwen_ondevice.runtime.engine import Engine

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
    report = {
        "precision": manifest["precision"],
        "accuracy": {k: v for k, v in acc.to_dict().items() if k != "seconds"},
        "reference": {"model": manifest["model"]["source"], "backend": "torch", "dtype": "float32"},
        "bundle_backend": "ort-cpu",
        "sizes": bytes_per_token(m),
        "mixed_precision": (manifest.get("quantization") or {}).get("mixed_precision"),
    }
    write_json(out / "report.json", report, indent=1)
    log(f"[report] {acc.format()}")
    return {"perplexity_ratio": acc.perplexity_ratio, "top1_agreement": acc.top1_agreement, "seconds": acc.seconds}
