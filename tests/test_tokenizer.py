"""Tokenization, chat template and stop ids of the demo model against transformers' own
tokenizer; streaming detokenization against a batch decode."""

from __future__ import annotations

import random

import pytest
from conftest import real_text

from qwen_ondevice.core.tokenizer import StreamingDetokenizer

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]


def hf_template_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def test_chat_template_matches_transformers(demo_tokenizer, hf_tokenizer):
    ids = demo_tokenizer.apply_chat_template(QUESTION)
    assert len(ids) == 37
    assert ids[:7] == [151644, 8948, 198, 2610, 525, 1207, 16948]  # <|im_start|>system\nYou are Qwen
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
    assert ids == hf_template_ids(hf_tokenizer, QUESTION)
    assert hf_tokenizer.decode(ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Bonjour, ça va ?"}],
        [
            {"role": "user", "content": "Write hello world in C"},
            {"role": "assistant", "content": "#include <stdio.h>\nint main(void) { puts(\"hello world\"); }"},
            {"role": "user", "content": "谢谢! Now in Rust 🦀"},
        ],
    ],
)
def test_multi_turn_and_system_templates_match_transformers(demo_tokenizer, hf_tokenizer, messages):
    assert demo_tokenizer.apply_chat_template(messages) == hf_template_ids(hf_tokenizer, messages)


def test_plain_encoding_matches_transformers(demo_tokenizer, hf_tokenizer):
    assert demo_tokenizer.encode("333") == [18, 18, 18]  # Qwen2 splits digits one by one
    text = real_text(3000, offset=10000) + " 中文 emoji 🙂 naïve café"
    ids = demo_tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.decode(ids) == text  # byte-level BPE round-trips exactly
    # special tokens written in text are the special tokens
    assert demo_tokenizer.encode("<|im_end|>") == [151645]


def test_stop_ids(demo_tokenizer, hf_tokenizer):
    assert {151645, 151643} <= set(demo_tokenizer.stop_ids)
    assert hf_tokenizer.convert_ids_to_tokens([151645, 151643]) == ["<|im_end|>", "<|endoftext|>"]
    assert hf_tokenizer.eos_token_id in demo_tokenizer.stop_ids


MIXED = (
    "Streaming test: naïve café, Ünïcödé. 中文分词测试：通义千问是一个大型语言模型。"
    "Emoji 🚀🎉👩‍👩‍👧‍👦 and 🇫🇷 flags; Japanese 日本語のテキスト, Korean 한국어 텍스트. "
    "Math ∀x∈ℝ: x² ≥ 0 — done. Wikitext style , with spaces before punctuation . It 's fine ."
)


def stream_pieces(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    return pieces, detok.flush()


def test_streaming_detokenizer_matches_batch_decode(demo_tokenizer, hf_tokenizer):
    ids = hf_tokenizer.encode(MIXED, add_special_tokens=False)
    # the text really splits characters across tokens, so holding back is exercised
    assert sum("\ufffd" in hf_tokenizer.decode([t]) for t in ids) >= 5
    pieces, tail = stream_pieces(demo_tokenizer, ids)
    for p in pieces:
        assert "\ufffd" not in p
        p.encode("utf-8")  # a complete, encodable string (no lone surrogates)
    assert "".join(pieces) + tail == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ("".join(pieces) + tail).encode("utf-8") == MIXED.encode("utf-8")
    assert tail == ""  # the text ends on a whole character
    # text comes out as soon as it is complete: every byte-complete prefix is emitted by then
    for k in range(1, len(ids) + 1):
        emitted = "".join(pieces[:k])
        full = hf_tokenizer.decode(ids[:k])
        assert full.startswith(emitted)
        if "\ufffd" not in full:
            assert emitted == full


def test_streaming_detokenizer_real_text(demo_tokenizer, hf_tokenizer):
    text = real_text(4000, offset=50000)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    pieces, tail = stream_pieces(demo_tokenizer, ids)
    assert ("".join(pieces) + tail).encode("utf-8") == text.encode("utf-8")


def test_streaming_detokenizer_incomplete_end_and_random_sequences(demo_tokenizer, hf_tokenizer):
    ids = hf_tokenizer.encode("ok 🚀", add_special_tokens=False)
    cut = ids[:-1]  # drop the last byte token of the emoji: the text ends mid-character
    assert hf_tokenizer.decode(cut).endswith("\ufffd")
    pieces, tail = stream_pieces(demo_tokenizer, cut)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == hf_tokenizer.decode(cut)  # flush gives what is held back

    # random sequences of byte-level tokens (the kind a sampler may produce)
    rng = random.Random(0)
    byte_ids = hf_tokenizer.encode(MIXED, add_special_tokens=False)
    for _ in range(20):
        seq = [rng.choice(byte_ids) for _ in range(40)]
        pieces, tail = stream_pieces(demo_tokenizer, seq)
        assert "".join(pieces) + tail == hf_tokenizer.decode(seq)
