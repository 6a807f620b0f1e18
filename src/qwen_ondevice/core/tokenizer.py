"""Tokenization, the checkpoint's own chat template, and streaming detokenization.

Built on ``tokenizers`` (the checkpoint's ``tokenizer.json``) and ``jinja2`` (its chat template),
not on ``transformers``: running a bundle needs neither torch nor transformers. The template is
rendered as ``transformers``' ``apply_chat_template`` renders it (a sandboxed environment with
``trim_blocks``, ``lstrip_blocks``, loop controls, its ``tojson`` filter and ``raise_exception``);
the tests compare token ids with ``transformers``' own tokenizer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer
from tokenizers.decoders import DecodeStream

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError

#: Qwen2's end-of-turn and end-of-text tokens; stop on them when the vocabulary has them.
QWEN2_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


#: The special tokens of tokenizer_config.json a chat template may name.
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(x) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return x.get("content") if isinstance(x, dict) else x


def _chat_template(folder: Path, config: dict) -> str | None:
    """The chat template: ``chat_template.jinja`` (newer checkpoints), else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates of which ``default`` is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t or None


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template compiled once (every request renders the same one) in the environment
    ``transformers``' ``apply_chat_template`` uses."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], special_tokens: dict[str, str | None]) -> str:
    """``template`` rendered over ``messages`` with a generation prompt, as ``transformers``'
    ``apply_chat_template(tokenize=False, add_generation_prompt=True)`` renders it.

    Raises:
        UserError: the template raises (its ``raise_exception``) or does not parse.
    """
    try:
        return _compiled_template(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template refused these messages: {e}") from None


@dataclass
class Tokenizer:
    """The checkpoint's fast tokenizer (``tokenizers``), its chat template and its stop-token ids.

    ``stop_ids`` are every end-of-turn id the checkpoint declares (generation_config and config
    ``eos_token_id``, the tokenizer's eos token, and ``<|im_end|>``/``<|endoftext|>`` when present).
    ``special_tokens``: tokenizer_config.json's bos/eos/pad/unk tokens (text or None).
    """

    fast: FastTokenizer
    stop_ids: tuple[int, ...]
    chat_template: str | None = None
    special_tokens: dict | None = None
    clean_up_spaces: bool = False

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig, generation_config: dict) -> "Tokenizer":
        """The tokenizer of a checkpoint or bundle folder (``tokenizer.json``, ``tokenizer_config.json``).

        Raises:
            UserError: no ``tokenizer.json`` (a fast tokenizer is needed), or it does not load.
        """
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{folder}: no tokenizer.json (the checkpoint's fast tokenizer is needed)")
        try:
            fast = FastTokenizer.from_file(str(path))
            cfg_path = folder / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except Exception as e:
            raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:160]})") from None
        special = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKENS}
        stop = _as_list(generation_config.get("eos_token_id")) + _as_list(config.eos_token_id)
        if special["eos_token"] is not None and fast.token_to_id(special["eos_token"]) is not None:
            stop.append(fast.token_to_id(special["eos_token"]))
        stop += [fast.token_to_id(t) for t in QWEN2_STOP_TOKENS if fast.token_to_id(t) is not None]
        return cls(fast=fast, stop_ids=tuple(dict.fromkeys(stop)), chat_template=_chat_template(folder, cfg),
                   special_tokens=special, clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of plain text, with no special tokens added (unless asked)."""
        return list(self.fast.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.fast.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def token_id(self, token: str | None) -> int | None:
        """The id of a token's text (None for None or an unknown token)."""
        return None if token is None else self.fast.token_to_id(token)

    def chat_text(self, messages: list[dict]) -> str:
        """``messages`` rendered with the tokenizer's own template and a generation prompt.

        Raises:
            UserError: the tokenizer has no chat template, or the template refuses the messages.
        """
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template; use `generate --raw` for plain text prompts")
        return render_chat_template(self.chat_template, messages, self.special_tokens or {})

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of :meth:`chat_text`.

        A conversation without a system message gets the template's default system prompt;
        nothing is prepended before the template's first token.

        Raises:
            UserError: as :meth:`chat_text`.
        """
        return self.encode(self.chat_text(messages))


def _clean_up_spaces(text: str) -> str:
    """``transformers``' ``clean_up_tokenization`` (for tokenizers that ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


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
        piece = self.stream.step(self.tok.fast, token) or ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the very end, as U+FFFD)."""
        rest = self.tok.decode(self.ids)[self.emitted:]
        self.emitted += len(rest)
        return rest
