"""Speculative decoding (runtime/speculative.py): prompt lookup, a draft model, and the acceptance
rule, held to plain decoding.

Greedy losslessness: an oracle drafter injects right and wrong tokens at every place (all
accepted, all rejected, a rejection at each index, a stop string inside an accepted run,
max_tokens mid draft, the last slots of the context), and the tokens must equal plain greedy
decoding through the same verify graph, one real token per call, and every kept cache slot too,
up to the host's float32 rounding of a row by its place in the call (see ``_same``). Sampling is checked against the target distribution with a chi-square test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import real_text

from qwen_ondevice.export.options import ExportOptions
from qwen_ondevice.export.pipeline import export
from qwen_ondevice.runtime.generate import generate
from qwen_ondevice.runtime.open_model import open_runtime
from qwen_ondevice.runtime.sampling import Sampler, SamplingParams
from qwen_ondevice.runtime.speculative import Draft, DraftModel, PromptLookup, TokenStream

AR, CL, K = 8, 64, 4


def test_prompt_lookup_continues_the_longest_recurring_ngram():
    pl = PromptLookup(max_ngram=3)
    h = [1, 2, 3, 8, 2, 3, 9, 1, 2, 3]
    # "1 2 3" recurs (ends at 3): what followed it, though "2 3" recurs more recently (ends at 6)
    assert pl.propose(h, 3).tokens == [8, 2, 3]
    assert pl.propose(h + [8], 2).tokens == [2, 3]  # incremental: "2 3 8" ... "3 8" ends at 4
    assert PromptLookup().propose([5, 6, 7], 4).tokens == []  # nothing recurs: no draft
    assert PromptLookup().propose([4, 4, 4, 4], 2).tokens == [4]  # the latest earlier "4 4 4" ends at 3
    assert PromptLookup(max_ngram=2).propose([7, 1, 2, 9, 1, 2], 8).tokens == [9, 1, 2]  # cut at the end


@pytest.fixture(scope="module")
def tiny_bundles(tiny_factory, tmp_path_factory):
    ckpt = tiny_factory(layers=2)
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for precision in ("fp32", "w4a16"):
        export(ExportOptions(model=str(ckpt), precision=precision, prompt_length=AR, context_length=CL, num_parts=2,
                             calibration_tokens=256, eval_tokens=0, chipset="none", weight_method="mse",
                             verify_tokens=K), root / precision)
        out[precision] = root / precision
        assert json.loads((root / precision / "manifest.json").read_text())["ar"] == [AR, K + 1, 1]
    return ckpt, out


class Oracle:
    """Drafts the reference continuation ``ref`` (prompt excluded), spoiled where ``wrong(step,
    i)`` says: token i of the draft of call ``step`` is replaced by a token the target never picks
    there."""

    def __init__(self, prompt_len: int, ref: list[int], wrong):
        self.n, self.ref, self.wrong, self.step = prompt_len, ref, wrong, 0

    def propose(self, history, k):
        pos = len(history) - self.n
        d = list(self.ref[pos : pos + k])
        for i in range(len(d)):
            if self.wrong(self.step, i):
                d[i] = (d[i] + 17) % 151000
        self.step += 1
        return Draft(d)


def _run(rt, ids, max_new, drafter=None, verify_always=False, stop=None, params=None):
    rt.engine.reset()
    r = generate(rt.engine, rt.tokenizer, ids, params or SamplingParams(), max_new_tokens=max_new, stop=stop,
                 drafter=drafter, draft_tokens=K, verify_always=verify_always)
    e = rt.engine
    n = len(e.tokens)
    cache = [(k[..., :n].copy(), v[:, :, :n].copy()) for k, v in zip(e.cache.keys, e.cache.values)]
    return r, list(e.tokens), cache


#: float32 relative rounding a token's K/V may carry with its row in the call (fp32 bundles).
F32_REL = 1e-5
#: Share of a uint8 cache that may sit one step off: a value moved by F32_REL of itself crosses a
#: rounding boundary with probability at most F32_REL * |v| / step <= F32_REL * 127.5 (|v| at most
#: 127.5 steps from the zero point); four times that expectation bounds a sample of thousands.
UINT8_FLIP_SHARE = 4 * F32_REL * 127.5


def _same(a, b):
    """Same tokens, text and finish, and the same KV cache up to the host's row rounding.

    ONNX Runtime's CPU kernels do not give a row the same float32 result whatever its place in
    the call (measured: a few units in the last place on the fp32 bundle's K/V), so a float32
    cache is held to F32_REL; in a uint8 cache that rounding tips a value sitting at a rounding
    boundary by one step (measured once: one byte of 5,376, after the rotation default changed
    the tiny model's values), so every byte is held within one step and all but
    UINT8_FLIP_SHARE of them equal."""
    ra, ta, ca = a
    rb, tb, cb = b
    assert ra.token_ids == rb.token_ids and ra.finish_reason == rb.finish_reason and ra.text == rb.text
    assert ta == tb
    for (ka, va), (kb, vb) in zip(ca, cb):
        if ka.dtype == np.float32:
            assert np.allclose(ka, kb, rtol=F32_REL, atol=1e-6) and np.allclose(va, vb, rtol=F32_REL, atol=1e-6)
        else:
            for x, y in ((ka, kb), (va, vb)):
                d = np.abs(x.astype(np.int16) - y.astype(np.int16))
                assert d.max() <= 1 and np.count_nonzero(d) <= UINT8_FLIP_SHARE * d.size, (d.max(), np.count_nonzero(d))


SCENARIOS = {
    "all accepted": lambda s, i: False,
    "all rejected": lambda s, i: True,
    **{f"rejected at {j}": (lambda j: lambda s, i: i == j)(j) for j in range(K)},
    "mixed": lambda s, i: (s * 7 + i) % 5 == 0,
}


@pytest.mark.parametrize("precision", ["fp32", "w4a16"])
def test_greedy_is_plain_decoding_through_the_verify_graph(tiny_bundles, precision):
    _, bundles = tiny_bundles
    rt = open_runtime(str(bundles[precision]))
    assert rt.engine.verify_ar == K + 1  # the bundle's verify graph, not the prompt processor
    ids = rt.tokenizer.encode(real_text(300))[:13]
    plain = _run(rt, ids, 30, verify_always=True)
    ref = plain[0].token_ids
    assert len(ref) == 30
    for name, wrong in SCENARIOS.items():
        _same(_run(rt, ids, 30, drafter=Oracle(len(ids), ref, wrong)), plain)
    # max_tokens in the middle of a draft; a stop string inside an accepted run
    short = _run(rt, ids, 7, verify_always=True)
    _same(_run(rt, ids, 7, drafter=Oracle(len(ids), ref, SCENARIOS["all accepted"])), short)
    stop = rt.tokenizer.decode(ref[9:11])
    if stop.strip():
        stopped = _run(rt, ids, 30, verify_always=True, stop=[stop])
        _same(_run(rt, ids, 30, drafter=Oracle(len(ids), ref, SCENARIOS["all accepted"]), stop=[stop]), stopped)
    # the last slots of the context: generation runs into CL
    long_ids = rt.tokenizer.encode(real_text(1000))[: CL - 12]
    end = _run(rt, long_ids, 40, verify_always=True)
    assert end[0].finish_reason == "length" and len(long_ids) + len(end[0].token_ids) == CL
    for wrong in (SCENARIOS["all accepted"], SCENARIOS["rejected at 1"]):
        _same(_run(rt, long_ids, 40, drafter=Oracle(len(long_ids), end[0].token_ids, wrong)), end)


def test_prompt_lookup_and_a_draft_model_keep_greedy_tokens(tiny_bundles, tiny_factory):
    ckpt, bundles = tiny_bundles
    rt = open_runtime(str(bundles["w4a16"]))
    ids = rt.tokenizer.encode(real_text(300))[:20] * 2  # a prompt that repeats: lookup drafts
    plain = _run(rt, ids, 16, verify_always=True)
    _same(_run(rt, ids, 16, drafter=PromptLookup()), plain)
    # a draft equal to the target accepts every drafted token
    same = open_runtime(str(bundles["w4a16"]))
    dm = DraftModel(same.engine, Sampler(SamplingParams()), rt.engine.config.vocab_size)
    r, _, _ = out = _run(rt, ids, 16, drafter=dm)
    _same(out, plain)
    # a tiny draft with another seed still gives the target's greedy tokens
    other = open_runtime(str(tiny_factory(layers=1, seed=5)), "torch", context_length=CL)
    _same(_run(rt, ids, 16, drafter=DraftModel(other.engine, Sampler(SamplingParams()), rt.engine.config.vocab_size)), plain)


def _chi_square_threshold(dof: int) -> float:
    """The 0.999 quantile of chi-square(dof), Wilson-Hilferty approximation (z = 3.0902)."""
    z = 3.090232306167813
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


class _Fixed:
    """A stand-in engine whose verify rows are fixed logits (the acceptance rule alone)."""

    def __init__(self, logits):
        self.logits, self.tokens, self.context_length = logits, [0], 1 << 20

    def verify_room(self):
        return 8

    def verify(self, tokens):
        self.tokens += tokens
        return [self.logits] * len(tokens)

    def feed(self, tokens):
        self.tokens += tokens
        return self.logits

    def truncate(self, n):
        del self.tokens[n:]


@pytest.mark.parametrize("drafter", ["prompt lookup", "draft model"])
def test_sampling_follows_the_target_distribution(drafter):
    """Draws of the first token after one verify call, over 10^5 trials: a chi-square test against
    the target's filtered distribution p (temperature 0.8, top-k 6), the draft q one-hot (prompt
    lookup proposing token 2) or another distribution (a draft model)."""
    V, trials = 8, 100_000
    target = np.array([2.0, 1.0, 0.5, 0.0, -0.5, 1.5, -1.0, 0.2], np.float32)
    params = SamplingParams(temperature=0.8, top_k=6, seed=0)
    p = Sampler(params).probabilities(target, [])
    rng = np.random.default_rng(1)
    q_model = np.array([0.05, 0.1, 0.4, 0.05, 0.1, 0.2, 0.05, 0.05])

    class Drafts:
        def propose(self, history, k):
            if drafter == "prompt lookup":
                return Draft([2])
            t = int(rng.choice(V, p=q_model))
            return Draft([t], q_model[None, :])

    counts = np.zeros(V)
    sampler = Sampler(params)
    for _ in range(trials):
        s = TokenStream(_Fixed(target), sampler, target, [0], drafter=Drafts(), draft_tokens=1)
        s.next()  # the first token comes from the prefill row
        counts[s.next()] += 1  # the drafted position: accepted or resampled
    keep = p > 0
    expected = p[keep] * trials
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert counts[~keep].sum() == 0
    assert chi2 < _chi_square_threshold(int(keep.sum()) - 1), (chi2, counts / trials, p)


def test_generate_command_with_prompt_lookup_prints_the_plain_tokens(tiny_bundles, capsys):
    import json

    from qwen_ondevice.cli.main import main

    _, bundles = tiny_bundles
    prompt = "alpha beta gamma delta alpha beta gamma delta alpha beta gamma"
    runs = {}
    for draft in ("none", "lookup"):
        assert main(["--quiet", "generate", str(bundles["w4a16"]), "--raw", "--prompt", prompt, "--max-new-tokens", "12",
                     "--json", "--draft", draft]) == 0
        runs[draft] = json.loads(capsys.readouterr().out)
    assert runs["lookup"]["token_ids"] == runs["none"]["token_ids"]
    s = runs["lookup"]["speculation"]
    assert s["draft"] == "lookup" and 0 <= s["accepted_tokens"] <= s["drafted_tokens"] and s["drafted_tokens"] > 0
    assert runs["none"]["speculation"]["drafted_tokens"] == 0
