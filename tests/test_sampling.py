"""The sampler on fixed vectors, and its filters against transformers' logits processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.runtime.sampling import Sampler, SamplingParams

P4 = np.array([0.3, 0.1, 0.1, 0.5])
LOGITS4 = np.log(P4).astype(np.float32)


def test_top_p_keeps_the_nucleus():
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    probs = s.probabilities(LOGITS4, [])
    # {0.5, 0.3} reach 0.8: exactly those two survive, renormalized
    np.testing.assert_allclose(probs, [0.375, 0.0, 0.0, 0.625], atol=1e-6)
    draws = [s(LOGITS4, []) for _ in range(4000)]
    assert set(draws) == {0, 3}
    # and in the right proportion (0.625 +- 5 sigma of a binomial over 4000 draws)
    frac3 = draws.count(3) / len(draws)
    assert abs(frac3 - 0.625) < 5 * np.sqrt(0.625 * 0.375 / len(draws))


def test_top_p_just_above_the_mass_keeps_one_more():
    probs = Sampler(SamplingParams(temperature=1.0, top_p=0.81)).probabilities(LOGITS4, [])
    kept = np.flatnonzero(probs)
    assert len(kept) == 3 and {0, 3} < set(kept)  # one of the two 0.1 tokens joins
    assert probs.sum() == pytest.approx(1.0)


def test_top_k():
    probs = Sampler(SamplingParams(temperature=1.0, top_k=1)).probabilities(LOGITS4, [])
    np.testing.assert_allclose(probs, [0, 0, 0, 1])
    probs = Sampler(SamplingParams(temperature=1.0, top_k=2)).probabilities(LOGITS4, [])
    np.testing.assert_allclose(probs, [0.375, 0, 0, 0.625], atol=1e-6)


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(1)
    s = Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=3))
    for _ in range(200):
        logits = rng.normal(0, 3, 1000).astype(np.float32)
        assert s(logits, []) == int(np.argmax(logits))
    assert s(LOGITS4, []) == 3


def test_full_distribution_draws_follow_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    T = 0.7
    expect = np.exp(logits / T) / np.exp(logits / T).sum()
    s = Sampler(SamplingParams(temperature=T, seed=7))
    np.testing.assert_allclose(s.probabilities(logits, []), expect, rtol=1e-6)
    n = 20000
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=5)
    sigma = np.sqrt(expect * (1 - expect) / n)
    assert np.all(np.abs(counts / n - expect) < 5 * sigma)


@pytest.mark.parametrize("logit", [2.0, -2.0])
def test_repetition_penalty_makes_a_repeated_token_less_likely(logit):
    logits = np.array([1.0, logit, 0.0, -0.5], np.float32)
    plain = Sampler(SamplingParams(temperature=1.0)).probabilities(logits, [1])
    penalized = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.3)).probabilities(logits, [1, 1])
    assert penalized[1] < plain[1]
    # tokens not in the history gain relative to it
    assert penalized[0] / penalized[1] > plain[0] / plain[1]
    # greedy too: a penalty can move the argmax off a repeated token
    top = np.array([1.0, 1.2, 0.0], np.float32)
    assert Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))(top, [1]) == 0
    assert Sampler(SamplingParams(temperature=0.0))(top, [1]) == 1


def test_filters_match_transformers_processors():
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.normal(0, 2, 500).astype(np.float32)
        history = rng.integers(0, 500, 30).tolist()
        T, k, p, rp = 0.8, int(rng.integers(5, 100)), float(rng.uniform(0.3, 0.95)), 1.2
        ours = Sampler(SamplingParams(temperature=T, top_k=k, top_p=p, repetition_penalty=rp)).probabilities(
            logits, history
        )
        ids = torch.tensor([history])
        x = torch.from_numpy(logits)[None].double()
        x = RepetitionPenaltyLogitsProcessor(rp)(ids, x)
        x = TemperatureLogitsWarper(T)(ids, x)
        x = TopKLogitsWarper(k)(ids, x)
        x = TopPLogitsWarper(p)(ids, x)
        ref = torch.softmax(x, -1)[0].numpy()
        np.testing.assert_array_equal(ours > 0, ref > 0, err_msg=f"trial {trial}: kept set differs")
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_same_seed_same_draws():
    logits = np.random.default_rng(2).normal(0, 1, 200).astype(np.float32)
    params = dict(temperature=0.9, top_p=0.95, top_k=50)
    a = Sampler(SamplingParams(seed=123, **params))
    b = Sampler(SamplingParams(seed=123, **params))
    c = Sampler(SamplingParams(seed=124, **params))
    da = [a(logits, []) for _ in range(100)]
    assert da == [b(logits, []) for _ in range(100)]
    assert da != [c(logits, []) for _ in range(100)]
    assert len(set(da)) > 10  # the draws really vary


@pytest.mark.parametrize(
    "kw", [dict(temperature=-0.1), dict(temperature=3.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
           dict(repetition_penalty=0.0)]
)
def test_out_of_range_parameters_are_user_errors(kw):
    with pytest.raises(UserError):
        Sampler(SamplingParams(**kw))
