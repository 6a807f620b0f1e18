"""Accuracy of a bundle against its float reference: perplexity, top-1 agreement, KL divergence.

Both models read the same held-out text in the same non-overlapping windows of W tokens; each
window starts from an empty cache, and every position but the last predicts the next token.
The bundle runs through the engine exactly as in generation (AR-128 chunks with its KV cache,
on ONNX Runtime CPU: the host simulation of the device numerics); the reference is the float
checkpoint on the torch backend.

perplexity = exp(mean negative log-likelihood) (Jelinek et al. 1977); KL is KL(reference ||
bundle) of the next-token distributions, in nats, averaged over positions. The perplexity ratio
is exp(mean d), d = NLL(bundle) - NLL(reference) per scored token, and its 95% interval comes
from batch means of d over blocks of :data:`BLOCK_TOKENS` consecutive positions
(``eval/stats.py`` :func:`mean_interval`): a few thousand tokens of one text leave the ratio a
point or more of noise, which the interval shows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import math

import numpy as np

from qwen_ondevice.core.bundle import read_manifest
from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.progress import bar
from qwen_ondevice.core.texts import default_evaluation_text, text_token_ids
from qwen_ondevice.eval.fidelity import measure_fidelity
from qwen_ondevice.eval.stats import Z_95, mean_interval
from qwen_ondevice.runtime.engine import Engine
from qwen_ondevice.runtime.open_model import open_runtime

DEFAULT_EVAL_TOKENS = 16384
DEFAULT_WINDOW = 1024
#: Consecutive scored positions averaged into one batch mean for the perplexity ratio's interval:
#: long enough that neighbouring blocks are nearly independent, short enough to give a few dozen
#: blocks per span of 1024 positions.
BLOCK_TOKENS = 64


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
    host_numerics: str = "exact"  # of the bundle's ort-cpu run (runtime.backends.ort_backend.HOST_NUMERICS)
    #: With ``by_position``: per span of window positions, ``positions`` [start, end), ``tokens``
    #: and the same metrics over that span.
    by_position: list[dict] = field(default_factory=list)
    #: 95% interval of ``perplexity_ratio`` (batch means, see the module docstring); None with
    #: fewer than two blocks
    perplexity_ratio_ci95: list[float] | None = None
    #: With two spans or more: the last span's perplexity ratio minus the first's, in points
    #: (percent), and its 95% interval (the two spans' intervals combined as independent).
    depth_change: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} vs float {self.reference_perplexity:.3f} "
            f"(ratio {self.perplexity_ratio:.4f}, {100 * (self.perplexity_ratio - 1):+.2f}%), "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%, mean KL {self.mean_kl:.4f} nats "
            f"[{self.tokens} tokens, {self.windows} windows of {self.window}, {self.text}"
            + (f", {self.host_numerics} host numerics]" if self.host_numerics != "exact" else "]")
            + (f"\n  perplexity ratio 95% interval {_points(self.perplexity_ratio_ci95)}" if self.perplexity_ratio_ci95 else "")
            + "".join(f"\n  positions {r['positions'][0]}-{r['positions'][1] - 1}: perplexity ratio "
                      f"{r['perplexity_ratio']:.4f} ({100 * (r['perplexity_ratio'] - 1):+.2f}%"
                      + (f", 95% interval {_points(r['perplexity_ratio_ci95'])}" if r.get("perplexity_ratio_ci95") else "")
                      + f"), top-1 {100 * r['top1_agreement']:.2f}%, mean KL {r['mean_kl']:.4f} [{r['tokens']} tokens]"
                      for r in self.by_position)
            + (f"\n  last span vs first: {self.depth_change['points']:+.2f} points of perplexity ratio "
               f"(95% interval {self.depth_change['ci95_points'][0]:+.2f} to {self.depth_change['ci95_points'][1]:+.2f})"
               if self.depth_change else "")
        )


def _points(ci: list[float]) -> str:
    return f"{100 * (ci[0] - 1):+.2f}% to {100 * (ci[1] - 1):+.2f}%"


def _log_ratio(d: np.ndarray) -> tuple[float, float, float] | None:
    """(mean, low, high) of the mean of ``d`` (n_windows, m): NLL differences, nats) from batch
    means over blocks of :data:`BLOCK_TOKENS` consecutive positions of each window; None with
    fewer than two blocks."""
    blocks = [float(b.mean()) for row in d for b in np.array_split(row, max(1, row.size // BLOCK_TOKENS))]
    return mean_interval(blocks) if len(blocks) >= 2 else None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis of x (W, V), float32, in two full-size arrays (the result
    and one scratch): a window of 1024 positions over a 152k vocabulary is 0.6 GB per array."""
    out = np.subtract(x, x.max(axis=-1, keepdims=True), dtype=np.float32)
    scratch = np.exp(out)
    out -= np.log(scratch.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return out


def window_metrics(logits: np.ndarray, ref_logits: np.ndarray, ids: list[int],
                   rows_per_block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one window, per position that predicts a next token (W - 1 of them): the bundle's NLL,
    the reference's NLL, whether their top-1 tokens agree, and KL(reference || bundle), each
    (W - 1,) float64 (nats). logits, ref_logits: (W, V) float32; ids: the W token ids. Works in
    blocks of ``rows_per_block`` positions, so a 4096-position window over a 152k vocabulary
    holds four 0.6 GB scratch arrays beside the two logits arrays, not four of 2.5 GB."""
    n = len(ids) - 1
    out = np.empty((4, n))
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        target = np.asarray(ids[r0 + 1 : r1 + 1])
        lp = _log_softmax(logits[r0:r1])
        lr = _log_softmax(ref_logits[r0:r1])
        rows = np.arange(r1 - r0)
        out[0, r0:r1] = -lp[rows, target]
        out[1, r0:r1] = -lr[rows, target]
        out[2, r0:r1] = lp.argmax(-1) == lr.argmax(-1)
        lp -= lr  # lp - lr, in place: KL(ref || bundle) = sum p_ref (lr - lp)
        np.exp(lr, out=lr)
        out[3, r0:r1] = -np.einsum("ij,ij->i", lr, lp, dtype=np.float64)
        del lp, lr
    return out[0], out[1], out[2], out[3]


def evaluate_engines(engine, reference, ids: list[int], window: int, text_name: str = "",
                     by_position: int | None = None) -> AccuracyReport:
    """Score ``ids`` in windows of ``window`` with the bundle ``engine`` and the ``reference``.

    ``by_position``: also report the metrics per span of this many positions of the window
    (:attr:`AccuracyReport.by_position`), e.g. 1024: whether the accuracy holds deep into the
    context (the position of a scored token is that of the token predicting it, 0-based).

    Raises:
        UserError: fewer tokens than one window, a window over the bundle's context length, or
            ``by_position`` below 1.
    """
    if window > engine.context_length:
        raise UserError(f"window {window} exceeds the bundle's context length {engine.context_length}")
    n_win = len(ids) // window
    if n_win == 0:
        raise UserError(f"the evaluation text holds {len(ids)} tokens, shorter than one window of {window}; pass a longer --text or a smaller --window")
    if by_position is not None and by_position < 1:
        raise UserError(f"--by-position must be at least 1, got {by_position}")
    span = by_position or window
    spans = np.arange(window - 1) // span  # the span of each scored position
    sums = np.zeros((4, int(spans[-1]) + 1))  # nll, nll_ref, top1, kl per span
    diffs = np.empty((n_win, window - 1))  # NLL(bundle) - NLL(reference) per scored position, nats
    t0 = time.perf_counter()
    with bar(total=n_win, desc="[evaluate]", unit="window") as progress:
        for w in range(n_win):
            chunk = ids[w * window : (w + 1) * window]
            metrics = window_metrics(engine.logits_all(chunk), reference.logits_all(chunk), chunk)
            for k, values in enumerate(metrics):
                sums[k] += np.bincount(spans, weights=values, minlength=sums.shape[1])
            diffs[w] = metrics[0] - metrics[1]
            done = (w + 1) * (window - 1)
            progress.set_postfix_str(f"perplexity {np.exp(sums[0].sum() / done):.3f} "
                                     f"(float {np.exp(sums[1].sum() / done):.3f})", refresh=False)
            progress.update()
    n = n_win * (window - 1)
    nll, nll_ref, top1, kl = sums.sum(axis=1)
    ppl, ppl_ref = float(np.exp(nll / n)), float(np.exp(nll_ref / n))
    rows, intervals = [], []
    if by_position:
        counts = np.bincount(spans) * n_win
        for s in range(sums.shape[1]):
            c = int(counts[s])
            intervals.append(_log_ratio(diffs[:, spans == s]))
            rows.append({"positions": [s * span, min((s + 1) * span, window - 1)], "tokens": c,
                         "perplexity": float(np.exp(sums[0, s] / c)), "reference_perplexity": float(np.exp(sums[1, s] / c)),
                         "perplexity_ratio": float(np.exp((sums[0, s] - sums[1, s]) / c)),
                         "perplexity_ratio_ci95": [math.exp(intervals[-1][1]), math.exp(intervals[-1][2])] if intervals[-1] else None,
                         "top1_agreement": float(sums[2, s] / c), "mean_kl": float(sums[3, s] / c)})
    overall = _log_ratio(diffs)
    depth = None
    if len(rows) >= 2 and intervals[0] and intervals[-1]:
        # delta method: r = exp(m), so sd(r) = r sd(m); the spans' errors taken as independent
        (r0, (_, lo0, hi0)), (r1, (_, lo1, hi1)) = ((rows[0]["perplexity_ratio"], intervals[0]), (rows[-1]["perplexity_ratio"], intervals[-1]))
        sd = math.hypot(r0 * (hi0 - lo0) / (2 * Z_95), r1 * (hi1 - lo1) / (2 * Z_95))
        change = 100 * (r1 - r0)
        depth = {"from": rows[0]["positions"], "to": rows[-1]["positions"], "points": change,
                 "ci95_points": [change - 100 * Z_95 * sd, change + 100 * Z_95 * sd]}
    return AccuracyReport(text_name, n, window, n_win, ppl, ppl_ref, ppl / ppl_ref, float(top1 / n), float(kl / n),
                          round(time.perf_counter() - t0, 1), by_position=rows,
                          perplexity_ratio_ci95=[math.exp(overall[1]), math.exp(overall[2])] if overall else None,
                          depth_change=depth)


def reference_engine(model: str, window: int):
    """The float reference: MODEL on the torch backend in float32, one call per window
    (AR = window), streamed layer by layer (``TorchBackend(stream=True)``): a 7B reference never
    holds the whole model."""
    from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
    ckpt = load_checkpoint(model)
    return Engine(TorchBackend(ckpt, context_length=window + 1, stream=True), prompt_length=window), ckpt


def evaluate_bundle(bundle: Path, reference: str | None = None, text: str | None = None,
                    tokens: int = DEFAULT_EVAL_TOKENS, window: int = DEFAULT_WINDOW, backend: str = "ort-cpu",
                  host_numerics: str = "exact", by_position: int | None = None,
                  float_activations: str | None = None, skip_tokens: int = 0) -> AccuracyReport:
    """Evaluate a bundle against its float reference (default: the model it was exported from).

    ``skip_tokens``: the scored text starts this many tokens into the held-out text, so the
    tokens a long window scores deep in its context can be scored again at the start of a short
    one (whether a loss deep in the context comes from the depth or from that text).

    ``host_numerics``: ``exact`` (the device simulation) or ``fast`` (ort-cpu only; see
    ``runtime.backends.ort_backend.HOST_NUMERICS``), to measure what the fast mode costs.
    ``by_position``: see :func:`evaluate_engines`. ``float_activations``: a diagnostic regular
    expression, the bundle's activations it matches run in float (``host_graph.float_activations``).

    Raises:
        UserError: a bad bundle, a missing reference, a negative ``skip_tokens``, or a text shorter
            than ``skip_tokens`` plus one window.
    """
    if skip_tokens < 0:
        raise UserError(f"--skip-tokens must be 0 or more, got {skip_tokens}")
    m = read_manifest(bundle)
    rt = open_runtime(str(bundle), backend, host_numerics=host_numerics, float_activations=float_activations)
    path = Path(text) if text else default_evaluation_text()
    tokens = tokens // window * window
    if tokens < window:
        raise UserError(f"--tokens {tokens} is shorter than one window of {window}")
    try:
        ids = text_token_ids(rt.tokenizer, path, skip_tokens + tokens, "evaluation")[skip_tokens:]
    except UserError as e:
        if "fewer than" in str(e):
            raise UserError(f"{e} (at least one window of {window} tokens is needed)") from None
        raise
    ref, _ = reference_engine(reference or m.data["model"]["source"], window)
    report = evaluate_engines(rt.engine, ref, ids, window, path.name, by_position)
    report.host_numerics = host_numerics
    return report



def evaluate_fidelity(bundle: Path, reference: str | None = None, prompts: int | None = None,
                      max_new_tokens: int = 256, backend: str = "ort-cpu", host_numerics: str = "exact",
                      float_activations: str | None = None):
    """Generation fidelity of a bundle against its float reference (default: the model it was
    exported from): :func:`qwen_ondevice.eval.fidelity.measure_fidelity` over the first
    ``prompts`` prompts (all when None).

    Raises:
        UserError: a bad bundle, a missing reference, a bad prompt count or length, or no prompt
            that fits the bundle's context length.
    """
    m = read_manifest(bundle)
    rt = open_runtime(str(bundle), backend, host_numerics=host_numerics, float_activations=float_activations)
    report = measure_fidelity(rt.engine, rt.tokenizer, reference or m.data["model"]["source"], prompts, max_new_tokens)
    if report.prompts == 0:
        raise UserError(f"none of the {report.skipped} fidelity prompts fits the bundle's context length {m.context_length}")
    return report
