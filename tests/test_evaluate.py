"""The accuracy metrics of ``evaluate``, against torch's own cross-entropy, KL and argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.eval.evaluate import evaluate_engines

V, WINDOW, CL = 50, 16, 32
#: evaluate takes log-softmax in float32 (memory: a 1024-position window over a 152k vocabulary is
#: 0.6 GB per array); log-probabilities of size ~10 then carry ~1e-6 of rounding, against float64 here.
REL = 1e-5


class FixedLogits:
    """An engine whose logits for a window are a fixed function of its tokens (seeded by them)."""

    context_length = CL

    def __init__(self, salt: int, scale: float):
        self.salt, self.scale = salt, scale

    def logits_all(self, ids: list[int]) -> np.ndarray:
        rng = np.random.default_rng([self.salt, *ids])
        return (self.scale * rng.standard_normal((len(ids), V))).astype(np.float32)


def reference_metrics(bundle, ref, ids, window, positions):
    """NLL sums, top-1 matches and KL sums over the scored ``positions`` of every window (torch)."""
    nll = nll_ref = top1 = kl = n = 0.0
    for w in range(len(ids) // window):
        chunk = ids[w * window : (w + 1) * window]
        lp = F.log_softmax(torch.from_numpy(bundle.logits_all(chunk)).double(), -1)[:-1][positions]
        lr = F.log_softmax(torch.from_numpy(ref.logits_all(chunk)).double(), -1)[:-1][positions]
        target = torch.tensor(chunk[1:])[positions]
        nll += F.nll_loss(lp, target, reduction="sum").item()
        nll_ref += F.nll_loss(lr, target, reduction="sum").item()
        top1 += (lp.argmax(-1) == lr.argmax(-1)).sum().item()
        kl += F.kl_div(lp, lr, log_target=True, reduction="sum").item()  # KL(ref || bundle)
        n += len(target)
    return {"tokens": n, "perplexity_ratio": np.exp((nll - nll_ref) / n), "top1_agreement": top1 / n,
            "mean_kl": kl / n, "perplexity": np.exp(nll / n)}


def test_metrics_overall_and_by_position_match_torch():
    ids = [int(x) for x in np.random.default_rng(0).integers(0, V, 3 * WINDOW + 5)]
    bundle, ref = FixedLogits(1, 2.0), FixedLogits(2, 2.0)
    r = evaluate_engines(bundle, ref, ids, WINDOW, "random", by_position=6)
    whole = reference_metrics(bundle, ref, ids, WINDOW, slice(None))
    assert r.windows == 3 and r.tokens == whole["tokens"] == 3 * (WINDOW - 1)
    for k in ("perplexity_ratio", "top1_agreement", "mean_kl", "perplexity"):
        assert getattr(r, k) == pytest.approx(whole[k], rel=REL), k
    # spans of 6 positions over the 15 scored positions of a window: [0, 6), [6, 12), [12, 15)
    assert [row["positions"] for row in r.by_position] == [[0, 6], [6, 12], [12, 15]]
    for row in r.by_position:
        want = reference_metrics(bundle, ref, ids, WINDOW, slice(*row["positions"]))
        assert row["tokens"] == want["tokens"]
        for k in ("perplexity_ratio", "top1_agreement", "mean_kl", "perplexity"):
            assert row[k] == pytest.approx(want[k], rel=REL), (row["positions"], k)
    assert "positions 12-14: perplexity ratio" in r.format()


def test_window_metrics_in_blocks_equal_one_block():
    from qwen_ondevice.eval.evaluate import window_metrics

    ids = [int(x) for x in np.random.default_rng(2).integers(0, V, WINDOW)]
    a, b = FixedLogits(1, 2.0).logits_all(ids), FixedLogits(2, 2.0).logits_all(ids)
    whole = window_metrics(a, b, ids, rows_per_block=WINDOW)
    for block in (1, 4, 7):
        for x, y in zip(window_metrics(a, b, ids, rows_per_block=block), whole):
            np.testing.assert_array_equal(x, y)


def test_identical_engines_score_ratio_one_and_no_kl():
    ids = [int(x) for x in np.random.default_rng(1).integers(0, V, 2 * WINDOW)]
    r = evaluate_engines(FixedLogits(3, 1.0), FixedLogits(3, 1.0), ids, WINDOW)
    assert r.perplexity_ratio == pytest.approx(1.0, abs=1e-12) and r.top1_agreement == 1.0
    assert abs(r.mean_kl) < 1e-9 and r.by_position == []


@pytest.mark.parametrize("window, by_position, message", [
    (CL + 1, None, "exceeds the bundle's context length"),
    (WINDOW, 0, "--by-position must be at least 1"),
])
def test_refusals(window, by_position, message):
    with pytest.raises(UserError, match=message):
        evaluate_engines(FixedLogits(1, 1.0), FixedLogits(2, 1.0), list(range(2 * CL)), window, by_position=by_position)


def test_perplexity_ratio_interval_from_batch_means_of_torch_nll():
    """The ratio's 95% interval: blocks of up to BLOCK_TOKENS consecutive positions per window
    (here each window's 15 positions, or its part of a span, are one block), their mean NLL
    differences from torch, exp(mean -+ 1.96 s / sqrt(k)); and the last span's change over the first."""
    from qwen_ondevice.eval.evaluate import BLOCK_TOKENS

    assert WINDOW - 1 < BLOCK_TOKENS
    ids = [int(x) for x in np.random.default_rng(4).integers(0, V, 4 * WINDOW)]
    bundle, ref = FixedLogits(1, 2.0), FixedLogits(2, 2.0)
    r = evaluate_engines(bundle, ref, ids, WINDOW, "random", by_position=6)

    def interval(positions):
        d = []
        for w in range(4):
            chunk = ids[w * WINDOW : (w + 1) * WINDOW]
            one = reference_metrics(bundle, ref, chunk, WINDOW, positions)
            d.append(np.log(one["perplexity_ratio"]))  # this window's mean NLL difference
        m, half = np.mean(d), 1.959964 * np.std(d, ddof=1) / np.sqrt(len(d))
        return np.exp(m), [np.exp(m - half), np.exp(m + half)]

    center, want = interval(slice(None))
    assert r.perplexity_ratio == pytest.approx(center, rel=REL)
    assert r.perplexity_ratio_ci95 == pytest.approx(want, rel=REL)
    assert r.perplexity_ratio_ci95[0] < r.perplexity_ratio < r.perplexity_ratio_ci95[1]
    first, last = interval(slice(0, 6)), interval(slice(12, 15))
    assert r.by_position[0]["perplexity_ratio_ci95"] == pytest.approx(first[1], rel=REL)
    assert r.by_position[-1]["perplexity_ratio_ci95"] == pytest.approx(last[1], rel=REL)
    # delta method: sd(exp m) = exp(m) sd(m), sd(m) from the log-scale half width
    sd = np.hypot(*(c * np.log(hi / lo) / (2 * 1.959964) for c, (lo, hi) in (first, last)))
    change = 100 * (last[0] - first[0])
    assert r.depth_change["points"] == pytest.approx(change, rel=REL)
    assert r.depth_change["ci95_points"] == pytest.approx([change - 196 * sd, change + 196 * sd], rel=1e-4)
    assert "last span vs first" in r.format() and "95% interval" in r.format()


def test_identical_engines_have_a_zero_width_interval():
    ids = [int(x) for x in np.random.default_rng(1).integers(0, V, 3 * WINDOW)]
    r = evaluate_engines(FixedLogits(3, 1.0), FixedLogits(3, 1.0), ids, WINDOW)
    assert r.perplexity_ratio_ci95 == pytest.approx([1.0, 1.0], abs=1e-9) and r.depth_change is None
