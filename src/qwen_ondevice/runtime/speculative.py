"""Speculative decoding: drafted tokens verified by the target in one call, lossless.

Decode on the NPU is bound by memory bandwidth: each call reads every weight once, and a call over
a few tokens costs about what a call over one costs. A drafter proposes k tokens; the target runs
``[last token, d1 .. dk]`` in one call of its verify graph and returns k + 1 rows of logits; the
host accepts drafted tokens while they are what the target itself would pick, takes the target's
own pick at the first miss, and rolls the host-owned KV cache back over the rejected slots (they
are overwritten later, masked until then).

- Greedy: a drafted token is accepted iff it is the target's argmax (after the repetition
  penalty), so the tokens are those of plain greedy decoding through the same graph, as far as
  the backend gives a row the same result whatever its place in the call (ONNX Runtime's CPU
  kernels can differ in the last float32 bit, which can tip a uint8 cache byte by one step).
- Sampling: the rejection rule of Leviathan et al. 2023 ("Fast Inference from Transformers via
  Speculative Decoding", Algorithm 1) and Chen et al. 2023: accept ``d`` with probability
  ``min(1, p(d) / q(d))``, else draw from ``norm(max(0, p - q))``; after k acceptances draw a bonus
  token from ``p``. p is the target's filtered distribution (temperature, top-k, top-p, repetition
  penalty: :meth:`~qwen_ondevice.runtime.sampling.Sampler.probabilities`), q the drafter's (a draft
  model's own, filtered alike; prompt lookup is the case q = one-hot). The output then follows p.

Drafters: :class:`PromptLookup` (n-grams of the prompt and the text so far, no extra model; the
method of transformers' ``prompt_lookup_num_tokens``, vLLM's ngram and llama.cpp's lookup) and
:class:`DraftModel` (a smaller model with its own engine and cache, e.g. Qwen2-0.5B for Qwen2-7B).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qwen_ondevice.runtime.open_model import open_runtime
from qwen_ondevice.runtime.sampling import Sampler

#: Tokens drafted per verify call by default (the verify graph is AR-(k + 1)).
DEFAULT_DRAFT_TOKENS = 4


@dataclass
class Draft:
    """Drafted token ids and, for a draft model that samples, their distributions q (k, V)
    float64 (``None``: one-hot, as prompt lookup and greedy drafts are)."""

    tokens: list[int]
    q: np.ndarray | None = None


class PromptLookup:
    """Prompt lookup decoding: the longest suffix n-gram of the sequence (``max_ngram`` down to
    ``min_ngram`` tokens) that occurred before, continued by the tokens that followed its most
    recent earlier occurrence. Costs no model call; proposes nothing when no n-gram recurs.

    The n-gram index is kept incrementally (one dict per n: n-gram -> end of its latest
    occurrence), so a proposal costs O(max_ngram) however long the sequence is.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._reset()

    def _reset(self) -> None:
        ns = range(self.min_ngram, self.max_ngram + 1)
        self._seq: list[int] = []
        self._last: dict[int, dict[tuple, int]] = {n: {} for n in ns}  # n-gram -> end of its latest occurrence
        self._prev: dict[int, dict[tuple, int]] = {n: {} for n in ns}  # ... and of the one before

    def _sync(self, history: list[int]) -> None:
        if self._seq != history[: len(self._seq)]:  # another sequence: start over
            self._reset()
        for i in range(len(self._seq), len(history)):
            self._seq.append(history[i])
            end = i + 1
            for n in self._last:
                if end >= n:
                    key = tuple(self._seq[end - n : end])
                    if key in self._last[n]:
                        self._prev[n][key] = self._last[n][key]
                    self._last[n][key] = end

    def propose(self, history: list[int], k: int) -> Draft:
        """Up to ``k`` tokens continuing ``history`` (the prompt and every token so far)."""
        self._sync(history)
        L = len(history)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if L < n:
                continue
            key = tuple(history[L - n :])
            end = self._prev[n].get(key) if self._last[n].get(key) == L else self._last[n].get(key)
            if end is not None and end < L:
                cont = history[end : end + k]
                if cont:
                    return Draft(list(cont))
        return Draft([])


class DraftModel:
    """A draft model with its own engine and KV cache: ``k`` tokens per proposal, greedy when the
    target samples greedily, else sampled from its own filtered distribution (returned as q).

    engine: an :class:`~qwen_ondevice.runtime.engine.Engine` of the draft (a checkpoint on torch or a
    bundle); it must share the target's tokenizer. Its vocabulary may be smaller or larger than
    the target's (Qwen2-0.5B: 151936, Qwen2-7B: 152064): its logits are cut or padded with -inf
    to ``target_vocab``.
    """

    def __init__(self, engine, sampler, target_vocab: int):
        self.engine = engine
        self.sampler = sampler
        self.target_vocab = target_vocab

    def _fit(self, logits: np.ndarray) -> np.ndarray:
        V = self.target_vocab
        if logits.shape[-1] >= V:
            return logits[..., :V]
        return np.concatenate([logits, np.full(logits.shape[:-1] + (V - logits.shape[-1],), -np.inf, np.float32)], -1)

    def propose(self, history: list[int], k: int) -> Draft:
        e = self.engine
        room = e.context_length - len(history) - 1
        k = min(k, room)
        if k < 1:
            return Draft([])
        common = 0
        for a, b in zip(e.tokens, history):
            if a != b:
                break
            common += 1
        common = min(common, len(history) - 1)
        e.truncate(common)
        logits = e.feed(history[common:])
        tokens, qs = [], []
        greedy = self.sampler.params.temperature == 0.0
        seq = list(history)
        for i in range(k):
            x = self._fit(logits)
            if greedy:
                t = self.sampler(x, seq)
            else:
                q = self.sampler.probabilities(x, seq)
                t = int(self.sampler.rng.choice(len(q), p=q))
                qs.append(q)
            tokens.append(t)
            seq.append(t)
            if i + 1 < k:
                logits = e.feed([t])
        return Draft(tokens, None if greedy else np.stack(qs))


@dataclass
class SpeculationStats:
    """What speculation did: target calls, tokens drafted and accepted (``usage`` extensions)."""

    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_calls: int = 0


class TokenStream:
    """The decode loop's source of next tokens, with or without a drafter.

    ``next()`` returns the next token given ``history`` (the prompt and every token returned so
    far, which the caller appends to); ``finish(keep)`` rolls the cache back to ``keep`` tokens
    when the caller stops (a stop token or string inside an accepted run, ``max_tokens`` mid
    draft), so the cache holds what plain decoding would have left.

    Without a drafter each step is one AR-1 call, as plain decoding. With one, each call goes
    through the engine's verify graph (:meth:`~qwen_ondevice.runtime.engine.Engine.verify`); a
    step with nothing drafted falls back to AR-1, unless ``verify_always`` (tests: one real token
    per verify call, the reference of losslessness through the same graph).
    """

    def __init__(self, engine, sampler, first_logits: np.ndarray, history: list[int], drafter=None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, verify_always: bool = False):
        self.engine, self.sampler, self.history = engine, sampler, history
        self.drafter, self.k, self.verify_always = drafter, draft_tokens, verify_always
        self.rows: list[np.ndarray] = [first_logits]
        self.draft: list[int] = []
        self.q: list[np.ndarray | None] = []
        self.last: int | None = None
        self.stats = SpeculationStats()

    def _refill(self) -> None:
        e = self.engine
        self.stats.target_calls += 1
        if self.drafter is None and not self.verify_always:  # plain decoding: one AR-1 call
            self.rows = [e.feed([self.last])]
            return
        d = Draft([])
        room = e.verify_room()
        k = min(self.k, room)
        if self.drafter is not None and k > 0:
            d = self.drafter.propose(self.history, k)
            d = Draft(d.tokens[:k], None if d.q is None else d.q[:k])
        if d.tokens or (self.verify_always and room >= 0):
            self.rows = list(e.verify([self.last] + d.tokens))
            self.stats.verify_calls += 1
        else:
            self.rows = [e.feed([self.last])]
        self.draft = list(d.tokens)
        self.q = [None] * len(d.tokens) if d.q is None else list(d.q)
        self.stats.drafted += len(d.tokens)

    def next(self) -> int:
        if not self.rows:
            self._refill()
        logits = self.rows.pop(0)
        if not self.draft:
            token = self.sampler(logits, self.history)
        else:
            expected, q = self.draft.pop(0), self.q.pop(0)
            token = self._accept_or_resample(logits, expected, q)
            if token == expected:
                self.stats.accepted += 1
            else:  # the drafted slots from ``expected`` on hold rejected tokens
                self.engine.truncate(len(self.engine.tokens) - len(self.draft) - 1)
                self.rows, self.draft, self.q = [], [], []
        self.last = token
        return token

    def _accept_or_resample(self, logits: np.ndarray, expected: int, q: np.ndarray | None) -> int:
        s = self.sampler
        if s.params.temperature == 0.0:
            return s(logits, self.history)
        p = s.probabilities(logits, self.history)
        qd = 1.0 if q is None else float(q[expected])
        if qd > 0 and s.rng.random() < min(1.0, p[expected] / qd):
            return expected
        residual = np.maximum(p - (np.eye(1, len(p), expected)[0] if q is None else q), 0.0)
        total = residual.sum()
        if total <= 0:  # p == q: any rejection is impossible in exact arithmetic
            return expected
        cdf = np.cumsum(residual / total)
        return int(min(np.searchsorted(cdf, s.rng.random() * cdf[-1], side="right"), len(p) - 1))

    def finish(self, keep: int) -> None:
        """Drop cache slots past ``keep`` tokens (drafted ones the caller never used); plain
        decoding never holds any."""
        if self.drafter is None and not self.verify_always:
            return
        if len(self.engine.tokens) > keep:
            self.engine.truncate(keep)
        self.rows, self.draft, self.q = [], [], []


#: ``--draft`` values that are not a MODEL.
NO_DRAFT, LOOKUP = "none", "lookup"


def drafter_factory(spec: str | None, target_vocab: int, context_length: int):
    """What ``--draft`` names, as a callable ``(sampling params) -> drafter`` for one generation,
    or None for ``none``: a fresh :class:`PromptLookup` each time for ``lookup``; else a
    :class:`DraftModel` over MODEL (a bundle, or a checkpoint on torch at the target's context
    length), opened once here and shared, sampled with the generation's parameters and its own
    RNG (seed + 1).

    Raises:
        UserError: MODEL cannot be opened (see ``runtime.open_model.open_runtime``).
    """
    if spec in (None, NO_DRAFT):
        return None
    if spec == LOOKUP:
        return lambda sampling: PromptLookup()
    draft = open_runtime(spec, context_length=context_length)

    def new(sampling) -> DraftModel:
        seed = None if sampling.seed is None else sampling.seed + 1
        return DraftModel(draft.engine, Sampler(replace(sampling, seed=seed)), target_vocab)

    return new
