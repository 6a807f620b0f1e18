"""Next-token sampling: repetition penalty, temperature, top-k, top-p, seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen_ondevice.core.errors import UserError


@dataclass
class SamplingParams:
    """How to pick each next token.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 disable those filters.
    repetition_penalty follows CTRL (Keskar et al. 2019, eq. 2 as implemented by ``transformers``):
    a logit of an already-seen token is divided by the penalty when positive, multiplied when negative.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raises UserError for out-of-range values."""
        if not (0.0 <= self.temperature <= 2.0):
            raise UserError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, history: list[int] | np.ndarray, penalty: float) -> np.ndarray:
    """Penalize every token id in ``history``: logits (V,) float32 -> a new (V,) array."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(history, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean (V,) mask of the nucleus (Holtzman et al. 2020): the most probable tokens whose
    cumulative probability first reaches ``top_p``. The top token is always kept."""
    order = np.argsort(-probs, kind="stable")
    cum_before = np.cumsum(probs[order]) - probs[order]
    keep_sorted = cum_before < top_p - 1e-6
    keep_sorted[0] = True
    mask = np.zeros_like(probs, dtype=bool)
    mask[order[keep_sorted]] = True
    return mask


class Sampler:
    """A plain callable ``sampler(logits (V,) float32, history) -> token id`` with its own RNG."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(self, logits: np.ndarray, history) -> np.ndarray:
        """The filtered distribution (V,) float64 that :meth:`__call__` draws from (temperature > 0)."""
        p = self.params
        x = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, p.repetition_penalty)
        x = x.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x >= kth, x, -np.inf)
        x = x - x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            probs = np.where(top_p_mask(probs, p.top_p), probs, 0.0)
            probs /= probs.sum()
        return probs

    def __call__(self, logits: np.ndarray, history) -> int:
        p = self.params
        if p.temperature == 0.0:
            x = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, p.repetition_penalty)
            return int(np.argmax(x))
        probs = self.probabilities(logits, history)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(probs) - 1))
