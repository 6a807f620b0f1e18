"""Accuracy of a bundle against its float reference: perplexity, top-1 agreement, KL divergence.

Both models read the same held-out text in the same non-overlapping windows of W tokens; each
window starts from an empty cache, and every position but the last predicts the next token.
The bundle runs through the engine exactly as in generation (AR-128 chunks with its KV cache,
on ONNX Runtime CPU: the host simulation of the device numerics); the reference is the float
checkpoint on the torch backend.

perplexity = exp(mean negative log-likelihood) (Jelinek et al. 1977); KL is KL(reference ||
bundle) of the next-token distributions, in nats, averaged over positions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .progress import bar

DEFAULT_EVAL_TOKENS = 16384
DEFAULT_WINDOW = 1024


@dataclass
class AccuracyReport:
    """Accuracy numbers of one evaluation run (``tokens`` scored positions over ``windows``)."""

    text: str
    tokens: int
    window: int
    windows: int
    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float
    top1_agreement: float
    mean_kl: float
    seconds: float
    host_numerics: str = "exact"  # of the bundle's ort-cpu run (backends.ort_backend.HOST_NUMERICS)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} vs float {self.reference_perplexity:.3f} "
            f"(ratio {self.perplexity_ratio:.4f}, {100 * (self.perplexity_ratio - 1):+.2f}%), "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%, mean KL {self.mean_kl:.4f} nats "
            f"[{self.tokens} tokens, {self.windows} windows of {self.window}, {self.text}"
            + (f", {self.host_numerics} host numerics]" if self.host_numerics != "exact" else "]")
        )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis of x (W, V), float32, in two full-size arrays (the result
    and one scratch): a window of 1024 positions over a 152k vocabulary is 0.6 GB per array."""
    out = np.subtract(x, x.max(axis=-1, keepdims=True), dtype=np.float32)
    scratch = np.exp(out)
    out -= np.log(scratch.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return out


def window_metrics(logits: np.ndarray, ref_logits: np.ndarray, ids: list[int]) -> tuple[float, float, int, float]:
    """For one window: (sum NLL bundle, sum NLL reference, top-1 matches, sum KL) over the
    W - 1 positions that predict a next token. logits (W, V) float32. Sums accumulate in float64."""
    target = np.asarray(ids[1:])
    lp = _log_softmax(logits[:-1])
    lr = _log_softmax(ref_logits[:-1])
    rows = np.arange(len(target))
    nll = -lp[rows, target].sum(dtype=np.float64)
    nll_ref = -lr[rows, target].sum(dtype=np.float64)
    top1 = int((lp.argmax(-1) == lr.argmax(-1)).sum())
    lp -= lr  # lp - lr, in place: KL(ref || bundle) = sum p_ref (lr - lp)
    np.exp(lr, out=lr)
    kl = -float(np.einsum("ij,ij->i", lr, lp, dtype=np.float64).sum())
    return float(nll), float(nll_ref), top1, kl


def evaluate_engines(engine, reference, ids: list[int], window: int, text_name: str = "") -> AccuracyReport:
    """Score ``ids`` in windows of ``window`` with the bundle ``engine`` and the ``reference``.

    Raises:
        UserError: fewer tokens than one window, or a window over the bundle's context length.
    """
    if window > engine.context_length:
        raise UserError(f"window {window} exceeds the bundle's context length {engine.context_length}")
    n_win = len(ids) // window
    if n_win == 0:
        raise UserError(f"the evaluation text holds {len(ids)} tokens, shorter than one window of {window}; pass a longer --text or a smaller --window")
    t0 = time.perf_counter()
    nll = nll_ref = kl = 0.0
    top1 = 0
    with bar(total=n_win, desc="[evaluate]", unit="window") as progress:
        for w in range(n_win):
            chunk = ids[w * window : (w + 1) * window]
            a, b, c, d = window_metrics(engine.logits_all(chunk), reference.logits_all(chunk), chunk)
            nll, nll_ref, top1, kl = nll + a, nll_ref + b, top1 + c, kl + d
            progress.set_postfix_str(f"perplexity {np.exp(nll / ((w + 1) * (window - 1))):.3f} "
                                     f"(float {np.exp(nll_ref / ((w + 1) * (window - 1))):.3f})", refresh=False)
            progress.update()
    n = n_win * (window - 1)
    ppl, ppl_ref = float(np.exp(nll / n)), float(np.exp(nll_ref / n))
    return AccuracyReport(text_name, n, window, n_win, ppl, ppl_ref, ppl / ppl_ref, top1 / n, kl / n,
                          round(time.perf_counter() - t0, 1))


def reference_engine(model: str, window: int):
    """The float reference: MODEL on the torch backend in float32, one call per window
    (AR = window), streamed layer by layer (``TorchBackend(stream=True)``): a 7B reference never
    holds the whole model."""
    from .backends.torch_backend import TorchBackend
    from .checkpoint import load_checkpoint
    from .engine import Engine

    ckpt = load_checkpoint(model)
    return Engine(TorchBackend(ckpt, context_length=window + 1, stream=True), prompt_length=window), ckpt


def evaluate_bundle(bundle: Path, reference: str | None = None, text: str | None = None,
                    tokens: int = DEFAULT_EVAL_TOKENS, window: int = DEFAULT_WINDOW, backend: str = "ort-cpu",
                  host_numerics: str = "exact") -> AccuracyReport:
    """Evaluate a bundle against its float reference (default: the model it was exported from).

    ``host_numerics``: ``exact`` (the device simulation) or ``fast`` (ort-cpu only; see
    ``backends.ort_backend.HOST_NUMERICS``), to measure what the fast mode costs.

    Raises:
        UserError: a bad bundle, a missing reference, or a text shorter than one window.
    """
    from .bundle import read_manifest
    from .calibrate import default_evaluation_text, text_token_ids
    from .runtime import open_runtime

    m = read_manifest(bundle)
    rt = open_runtime(str(bundle), backend, host_numerics=host_numerics)
    path = Path(text) if text else default_evaluation_text()
    tokens = tokens // window * window
    if tokens < window:
        raise UserError(f"--tokens {tokens} is shorter than one window of {window}")
    try:
        ids = text_token_ids(rt.tokenizer, path, tokens, "evaluation")
    except UserError as e:
        if "fewer than" in str(e):
            raise UserError(f"{e} (at least one window of {window} tokens is needed)") from None
        raise
    ref, _ = reference_engine(reference or m.data["model"]["source"], window)
    report = evaluate_engines(rt.engine, ref, ids, window, path.name)
    report.host_numerics = host_numerics
    return report


def register_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity, top-1 agreement and KL of a bundle against the float model")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--reference", default=None, help="float MODEL to compare with (default: the model the bundle was exported from)")
    p.add_argument("--text", default=None, help="held-out text file (default: WikiText-2 test, shipped)")
    p.add_argument("--tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--backend", choices=["ort-cpu", "qnn-htp"], default="ort-cpu")
    from .cli_args import add_host_numerics_arg

    add_host_numerics_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    r = evaluate_bundle(args.bundle, args.reference, args.text, args.tokens, args.window, args.backend, args.host_numerics)
    print(json.dumps(r.to_dict(), indent=1) if args.json else r.format())
    return 0
