"""Streaming generation: the one loop behind ``generate``, ``chat`` and ``serve``.

``stream_generate`` yields :class:`GenerationChunk` records (text piece, token, finish reason,
counts, timings); ``generate`` concatenates them. Stop tokens end the turn and are never emitted;
stop strings are cut exactly, with text that might begin one held back until it is decided; the
context end finishes with ``length``. With a drafter, tokens come from speculative decoding
(:mod:`qwen_ondevice.runtime.speculative`): the same tokens greedily, the same distribution when
sampling, several per target call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.tokenizer import StreamingDetokenizer, Tokenizer
from qwen_ondevice.runtime.engine import Engine
from qwen_ondevice.runtime.sampling import Sampler, SamplingParams
from qwen_ondevice.runtime.speculative import DEFAULT_DRAFT_TOKENS, TokenStream


class StopStringFilter:
    """Holds back text that could be the start of a stop string; cuts at the first stop string.

    ``push(piece)`` returns (text safe to emit, stopped). ``flush()`` returns the held text when
    generation ends for another reason. The stop string itself is never returned.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        first = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.held = ""
            return text[:first], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class GenerationChunk:
    """One step of a stream.

    text: new text (may be ''); token: the sampled token id (None on the final record when it
    carries no token); finish_reason: None, 'stop' (stop token or string) or 'length' (max new
    tokens or the context end); timings in seconds; tokens/s derived from them; target_calls,
    drafted_tokens, accepted_tokens, verify_calls: speculative decoding so far (target calls after
    the prefill, and how many of them went through the verify graph rather than AR-1).
    """

    text: str
    token: int | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    target_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_calls: int = 0


@dataclass
class GenerationResult:
    """What ``generate`` returns: the concatenated stream."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    time_to_first_token: float
    prompt_tps: float
    generation_tps: float
    timings: dict = field(default_factory=dict)
    speculation: dict = field(default_factory=dict)  # target_calls, drafted_tokens, accepted_tokens, verify_calls


def stream_generate(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    drafter=None,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    verify_always: bool = False,
) -> Iterator[GenerationChunk]:
    """Generate after ``prompt_ids``; yields text pieces as they become final.

    The last record has a finish_reason. ``token_ids`` of the generated sequence exclude the
    stop token. Generation ends with 'length' at ``max_new_tokens`` or when the sequence reaches
    the context length. ``drafter`` (:class:`~qwen_ondevice.runtime.speculative.PromptLookup`,
    :class:`~qwen_ondevice.runtime.speculative.DraftModel`): speculative decoding with up to
    ``draft_tokens`` drafted tokens per target call; ``verify_always`` sends even undrafted steps
    through the verify graph (the reference of the losslessness tests). A stop inside an accepted
    run ends where plain decoding ends, and the cache is rolled back to what plain decoding holds.

    Raises:
        UserError: the prompt does not fit the context, or a sampling parameter is out of range.
    """
    sampling = sampling or SamplingParams()
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(sampling)
    detok = StreamingDetokenizer(tokenizer)
    stops = StopStringFilter(stop or [])
    stop_ids = set(tokenizer.stop_ids)

    t0 = time.perf_counter()
    logits = engine.prefill(list(prompt_ids))
    t_prefill = time.perf_counter() - t0
    history = list(prompt_ids)
    n_gen = 0
    ttft = None
    t_gen0 = time.perf_counter()

    def stats(text, token, reason):
        gen_time = time.perf_counter() - t_gen0
        return GenerationChunk(
            text=text,
            token=token,
            finish_reason=reason,
            prompt_tokens=len(prompt_ids),
            generation_tokens=n_gen,
            time_to_first_token=ttft or 0.0,
            prompt_tps=len(prompt_ids) / t_prefill if t_prefill > 0 else 0.0,
            generation_tps=(n_gen - 1) / gen_time if n_gen > 1 and gen_time > 0 else 0.0,
            target_calls=spec.stats.target_calls,
            drafted_tokens=spec.stats.drafted,
            accepted_tokens=spec.stats.accepted,
            verify_calls=spec.stats.verify_calls,
        )

    def final_text(prefix: str) -> tuple[str, bool]:
        """prefix + what the detokenizer and the stop filter still hold; True if a stop string hit."""
        tail, hit = stops.push(detok.flush())
        return prefix + tail + ("" if hit else stops.flush()), hit

    spec = TokenStream(engine, sampler, logits, history, drafter, draft_tokens, verify_always)
    while True:
        token = spec.next()
        if ttft is None:
            ttft = time.perf_counter() - t0
            t_gen0 = time.perf_counter()
        if token in stop_ids:
            spec.finish(len(history))  # plain decoding has fed every emitted token
            yield stats(final_text("")[0], None, "stop")
            return
        n_gen += 1
        history.append(token)
        text, hit = stops.push(detok.add(token))
        if hit:
            spec.finish(len(history) - 1)  # ... and not the last one
            yield stats(text, token, "stop")
            return
        if n_gen >= max_new_tokens or len(prompt_ids) + n_gen >= engine.context_length:
            spec.finish(len(history) - 1)
            text, hit = final_text(text)
            yield stats(text, token, "stop" if hit else "length")
            return
        yield stats(text, token, None)


def generate(engine, tokenizer, prompt_ids, sampling=None, max_new_tokens=256, stop=None, drafter=None,
             draft_tokens: int = DEFAULT_DRAFT_TOKENS, verify_always: bool = False) -> GenerationResult:
    """Run :func:`stream_generate` to the end and concatenate it."""
    pieces, tokens = [], []
    last = None
    for chunk in stream_generate(engine, tokenizer, prompt_ids, sampling, max_new_tokens, stop, drafter, draft_tokens,
                                 verify_always):
        pieces.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        last = chunk
    return GenerationResult(
        text="".join(pieces),
        prompt_ids=list(prompt_ids),
        token_ids=tokens,
        finish_reason=last.finish_reason,
        time_to_first_token=last.time_to_first_token,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        speculation={"target_calls": last.target_calls, "drafted_tokens": last.drafted_tokens,
                     "accepted_tokens": last.accepted_tokens, "verify_calls": last.verify_calls},
    )
