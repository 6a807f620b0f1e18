"""Tokenization, the checkpoint's own chat template, and streaming detokenization."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers.decoders import DecodeStream

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError

#: Qwen2's end-of-turn and end-of-text tokens; stop on them when the vocabulary has them.
QWEN2_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


@dataclass
class Tokenizer:
    """The checkpoint's ``transformers`` fast tokenizer plus its stop-token ids.

    ``stop_ids`` are every end-of-turn id the checkpoint declares (generation_config and config
    ``eos_token_id``, the tokenizer's eos token, and ``<|im_end|>``/``<|endoftext|>`` when present).
    """

    hf: object
    stop_ids: tuple[int, ...]

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig, generation_config: dict) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:160]})") from None
        stop = _as_list(generation_config.get("eos_token_id")) + _as_list(config.eos_token_id)
        if hf.eos_token_id is not None:
            stop.append(int(hf.eos_token_id))
        vocab = hf.get_vocab()
        stop += [vocab[t] for t in QWEN2_STOP_TOKENS if t in vocab]
        return cls(hf=hf, stop_ids=tuple(dict.fromkeys(stop)))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, with no special tokens added."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Render ``messages`` with the tokenizer's own template and a generation prompt.

        A conversation without a system message gets the template's default system prompt;
        nothing is prepended before the template's first token.

        Raises:
            UserError: the tokenizer has no chat template.
        """
        if not getattr(self.hf, "chat_template", None):
            raise UserError("this tokenizer has no chat template; use `generate --raw` for plain text prompts")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)


class StreamingDetokenizer:
    """Turns a growing list of token ids into text pieces without splitting UTF-8 characters.

    Built on ``tokenizers``' own incremental decoder (:class:`tokenizers.decoders.DecodeStream`),
    which holds back a byte-level token until the character it starts is complete. The
    concatenation of all pieces plus :meth:`flush` equals ``decode(all_ids)`` with special tokens
    skipped.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already given out
        self.stream = DecodeStream(skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append one token; return the text that is now complete ('' if none yet)."""
        self.ids.append(token)
        piece = self.stream.step(self.tok.hf.backend_tokenizer, token) or ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the very end, as U+FFFD)."""
        rest = self.tok.decode(self.ids)[self.emitted:]
        self.emitted += len(rest)
        return rest
