"""The generation engine: host-owned KV cache, positions and mask; chunked prefill; AR-1 decode.

One engine, several backends (``torch``, ``ort-cpu``, ``qnn-htp``) behind :class:`Backend`. The
engine never looks inside a backend's graphs: it hands each call the inputs of docs/graph-contract.md
(``input_ids`` (1, AR), ``attention_mask`` (1, 1, AR, CL), cos/sin (1, 1, AR, D/2), the past KV)
and writes the AR new KV entries a call returns into its cache.

Cache layout: entries are kept left-aligned. Slot ``j`` of layer ``l`` holds the key/value of the
``j``-th token of the sequence; an AR-N call sees the first ``P = CL - N`` slots as its past. The
cache therefore has ``CL - 1`` slots (the past of the AR-1 graph), and a sequence holds at most
CL tokens in all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.rope import rope_tables


class KVCache:
    """Per-layer key and value buffers: keys (KVH, 1, D, C), values (KVH, 1, C, D), C = CL - 1.

    ``dtype`` is the backend's cache dtype (float32 for float graphs, uint8 for quantized ones);
    the engine copies entries in and out without interpreting them.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype=np.float32):
        self.capacity = capacity
        self.keys = [np.zeros((kv_heads, 1, head_dim, capacity), dtype) for _ in range(num_layers)]
        self.values = [np.zeros((kv_heads, 1, capacity, head_dim), dtype) for _ in range(num_layers)]

    def past(self, layer: int, P: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the first P slots of ``layer``: (KVH, 1, D, P) and (KVH, 1, P, D)."""
        return self.keys[layer][..., :P], self.values[layer][:, :, :P, :]

    def write(self, layer: int, start: int, new_key: np.ndarray, new_value: np.ndarray, n: int) -> None:
        """Store the first ``n`` of the new entries (KVH, 1, D, AR) / (KVH, 1, AR, D) at ``start``.

        Entries past the capacity are dropped: the CL-th token of a full sequence has no slot, and
        needs none, since no later token can attend to it.
        """
        n = min(n, self.capacity - start)
        self.keys[layer][..., start : start + n] = new_key[..., :n]
        self.values[layer][:, :, start : start + n, :] = new_value[:, :, :n, :]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class Backend(ABC):
    """Runs the model's graphs for one AR-sized call.

    Attributes:
        name: ``torch`` / ``ort-cpu`` / ``qnn-htp``.
        config: the model configuration.
        context_length: CL, fixed by the backend (a bundle's graphs are static).
        ar_lengths: the AR values the backend has graphs for; ``None`` means any AR (torch).
        kv_dtype: numpy dtype of the KV cache entries the graphs consume and produce.
    """

    name: str
    config: ModelConfig
    context_length: int
    ar_lengths: tuple[int, ...] | None = None
    kv_dtype = np.float32

    @abstractmethod
    def forward(
        self,
        input_ids: np.ndarray,  # (1, AR) int32
        attention_mask: np.ndarray,  # (1, 1, AR, CL) float32, additive
        cos: np.ndarray,  # (1, 1, AR, D/2) float32
        sin: np.ndarray,  # (1, 1, AR, D/2) float32
        cache: KVCache,  # the past is its first CL - AR slots
        n_past: int,  # slots filled before this call (where the new entries go)
        n_valid: int,  # real (unpadded) tokens in this call
        last_only: bool = False,
    ) -> np.ndarray:
        """Run every part for one call; write the n_valid new KV entries into ``cache`` at
        ``n_past``; return logits (n_valid, V) float32, or (1, V) for the last valid token only
        when ``last_only`` (a backend may skip the lm_head for the other rows)."""

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.context_length - 1, self.kv_dtype)


@dataclass
class CallInputs:
    """The host-made inputs of one call (docs/graph-contract.md)."""

    input_ids: np.ndarray  # (1, AR) int32, padded with 0
    attention_mask: np.ndarray  # (1, 1, AR, CL) float32
    cos: np.ndarray  # (1, 1, AR, D/2) float32
    sin: np.ndarray  # (1, 1, AR, D/2) float32


def make_call_inputs(
    tokens: list[int], ar: int, n_past: int, cl: int, cos_table: np.ndarray, sin_table: np.ndarray, mask_value: float
) -> CallInputs:
    """Inputs for ``len(tokens) <= ar`` new tokens after ``n_past`` cached ones.

    Mask columns [0, P) are the past slots (visible when < n_past); columns [P, CL) are this
    call's tokens (causal). Padded rows see only pads and their outputs are discarded. Positions
    are ``cumsum(mask) - 1`` of the valid tokens, i.e. n_past, n_past + 1, ...; pads get 0.
    """
    n = len(tokens)
    P = cl - ar
    if n > ar or n_past > P:
        raise ValueError(f"{n} tokens after {n_past} do not fit an AR-{ar} call at CL {cl}")
    ids = np.zeros((1, ar), np.int32)
    ids[0, :n] = tokens
    mask = np.full((ar, cl), mask_value, np.float32)
    mask[:, :n_past] = 0.0
    mask[:, P:][np.tril(np.ones((ar, ar), bool))] = 0.0
    pos = np.zeros(ar, np.int64)
    pos[:n] = np.arange(n_past, n_past + n)
    return CallInputs(ids, mask[None, None], cos_table[pos][None, None], sin_table[pos][None, None])


class Engine:
    """Prefill and decode over a backend, owning the KV cache and the token history.

    ``prompt_length`` is the AR of the prompt processor (128 by default); decoding uses AR-1.
    The engine keeps the tokens whose KV is cached, so a new prompt that extends the previous
    conversation only prefills what is new (the common prefix is reused).
    """

    def __init__(self, backend: Backend, prompt_length: int = 128, mask_value: float = -1.0e4):
        if backend.ar_lengths is not None and prompt_length not in backend.ar_lengths:
            prompt_length = max(backend.ar_lengths)
        if prompt_length >= backend.context_length:
            raise UserError(f"prompt length (AR) {prompt_length} must be below the context length {backend.context_length}")
        self.backend = backend
        self.config = backend.config
        self.ar = prompt_length
        self.context_length = backend.context_length
        self.mask_value = mask_value
        self.cache = backend.new_cache()
        self.tokens: list[int] = []
        self.exact = 0  # leading cached tokens whose KV a fresh prefill would compute bit for bit
        self.reused = 0  # cached prompt tokens the last prefill kept
        self.cos_table, self.sin_table = rope_tables(self.config, np.arange(self.context_length))  # (CL, D/2)

    def reset(self) -> None:
        """Forget the cached sequence (the buffers are reused)."""
        self.tokens = []
        self.exact = 0

    def _call(self, tokens: list[int], ar: int, last_only: bool = False) -> np.ndarray:
        n_past = len(self.tokens)
        x = make_call_inputs(tokens, ar, n_past, self.context_length, self.cos_table, self.sin_table, self.mask_value)
        logits = self.backend.forward(
            x.input_ids, x.attention_mask, x.cos, x.sin, self.cache, n_past, len(tokens), last_only=last_only
        )
        self.tokens.extend(tokens)
        return logits

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; return the logits (V,) float32 after the last one.

        Tokens go in chunks of :meth:`chunk_ar` (the last one padded): AR-sized while they fit the
        prompt processor's past (n_past <= CL - AR), a tail through the smallest graph that holds
        it, the rest one at a time through the AR-1 graph.

        Raises:
            UserError: the sequence would exceed the context length.
        """
        if not tokens:
            raise ValueError("feed() needs at least one token")
        total = len(self.tokens) + len(tokens)
        if total > self.context_length:
            raise UserError(
                f"the sequence would be {total} tokens, {total - self.context_length} over the context length {self.context_length}"
            )
        logits = None
        i = 0
        while i < len(tokens):
            ar = self.chunk_ar(len(tokens) - i, len(self.tokens))
            n = min(len(tokens) - i, ar)
            logits = self._call(tokens[i : i + n], ar, last_only=ar > 1)
            i += n
        return logits[-1]

    def chunk_ar(self, rest: int, n_past: int) -> int:
        """AR of the call that feeds the next of ``rest`` (>= 1) tokens after ``n_past`` cached
        ones, chosen as Genie's qnn-htp engine chooses its graph for a prompt (observed in its
        log on the simulator, docs/device.md): while the prompt processor's past fits (n_past <=
        CL - AR), the smallest graph above AR-1 whose AR holds all ``rest`` tokens, else the
        prompt processor; AR-1 for a single token and past that point. With the usual AR-128 and
        AR-1 graphs that is AR-128 for every chunk; a bundle's verify graph (AR-(k + 1)) takes a
        prompt's tail of 2 to k + 1 tokens. A backend that takes any AR (torch) has one choice."""
        if rest == 1 or self.ar == 1 or n_past > self.context_length - self.ar:
            return 1
        ars = self.backend.ar_lengths or (self.ar,)
        return min(a for a in ars if a >= min(rest, self.ar) and 1 < a <= self.ar)

    def prompt_ars(self, n: int) -> list[int]:
        """The ARs of the calls :meth:`feed` makes for ``n`` tokens on an empty cache, in order."""
        out, done = [], 0
        while done < n:
            ar = self.chunk_ar(n - done, done)
            out.append(ar)
            done += min(n - done, ar)
        return out

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """Make the sequence equal ``prompt`` (reusing a cached common prefix) and return the
        logits (V,) float32 of its last token.

        Raises:
            UserError: the prompt is empty or does not fit the context length.
        """
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) >= self.context_length:
            over = len(prompt) - self.context_length
            raise UserError(
                f"the prompt is {len(prompt)} tokens, "
                + (f"{over} over" if over > 0 else "no room left in")
                + f" the context length {self.context_length}; shorten it or export with a larger --context-length"
            )
        # Reuse only KV that a fresh prefill would compute identically: prompt KV (not decoded
        # tokens, which came from AR-1 calls) cut back to an AR boundary, where fresh chunks start.
        # Logits then do not depend on what ran before, so a seeded request gives the same text
        # alone, after another request, streamed or not.
        limit = min(self.exact, len(prompt) - 1, len(self.tokens))
        common = 0
        while common < limit and self.tokens[common] == prompt[common]:
            common += 1
        singles_from = ((self.context_length - self.ar) // self.ar + 1) * self.ar
        keep = common if common >= singles_from else common - common % self.ar
        self.tokens = self.tokens[:keep]
        self.reused = keep
        self.exact = keep
        logits = self.feed(prompt[keep:])
        self.exact = len(prompt)
        return logits

    @property
    def verify_ar(self) -> int | None:
        """AR of the graph that verifies drafted tokens: the smallest AR above 1 the backend has
        (a bundle's verify graph, else its prompt processor); None for a backend that takes any
        AR (torch), which verifies k + 1 tokens in a call of AR k + 1."""
        ars = self.backend.ar_lengths
        return None if ars is None else min((a for a in ars if a > 1), default=None)

    def verify_room(self) -> int:
        """How many drafted tokens one verify call can take with the pending token now: the
        verify graph's AR - 1, fewer near the end of the context; -1 when the verify graph cannot
        run (the past no longer fits its P = CL - AR slots, or the backend has no AR above 1)."""
        ar = self.verify_ar
        left = self.context_length - len(self.tokens) - 1
        if ar is None:
            return left if self.backend.ar_lengths is None else -1
        if len(self.tokens) > self.context_length - ar:
            return -1
        return min(ar - 1, left)

    def verify(self, tokens: list[int]) -> list[np.ndarray]:
        """Append ``tokens`` (the pending token and the drafted ones) in one call of the verify
        graph and return the logits (V,) float32 after each of them, in order.

        Raises:
            ValueError: more tokens than :meth:`verify_room` allows plus one.
        """
        if not tokens or len(tokens) - 1 > self.verify_room():
            raise ValueError(f"verify() takes 1 to {self.verify_room() + 1} tokens now, got {len(tokens)}")
        ar = self.verify_ar or len(tokens)
        return list(self._call(tokens, ar))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (rolling back drafted ones); the slots after them
        are masked until they are written again."""
        self.tokens = self.tokens[:n]
        self.exact = min(self.exact, n)

    def logits_all(self, prompt: list[int]) -> np.ndarray:
        """Logits (n, V) float32 of every position of ``prompt``, fed from an empty cache in the
        chunks of :meth:`feed` (used by tests and perplexity evaluation)."""
        self.reset()
        out = []
        i = 0
        while i < len(prompt):
            ar = self.chunk_ar(len(prompt) - i, len(self.tokens))
            n = min(ar, len(prompt) - i)
            out.append(self._call(prompt[i : i + n], ar))
            i += n
        return np.concatenate(out, axis=0)
