"""The real demo model end to end: ``qwen-ondevice generate demo --json`` (greedy, chunked
prefill, KV-cached decode) gives the token ids of ``transformers``' ``generate(do_sample=False)``
on the ids of transformers' own chat template."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_ondevice.cli.main import main

MAX_NEW = 32
STOP_IDS = (151645, 151643)

pytestmark = pytest.mark.demo


def hf_template_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize(
    "prompt",
    [
        "What is 2 plus 2?",  # a short answer that ends with <|im_end|>
        "Write a Python function that returns the n-th Fibonacci number.",  # runs to the length limit
    ],
)
def test_cli_greedy_equals_transformers_generate(capsys, demo_checkpoint, demo_hf_model, hf_tokenizer, prompt):
    capsys.readouterr()
    code = main(["--quiet", "generate", "demo", "--prompt", prompt, "--json", "--max-new-tokens", str(MAX_NEW)])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)

    ref_prompt = hf_template_ids(hf_tokenizer, [{"role": "user", "content": prompt}])
    assert res["prompt_ids"] == ref_prompt

    with torch.no_grad():
        seq = demo_hf_model.generate(
            torch.tensor([ref_prompt]), attention_mask=torch.ones(1, len(ref_prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=list(STOP_IDS), pad_token_id=151643,
        )[0, len(ref_prompt):].tolist()
    # transformers appends the stop token and ends there; ours ends the turn without emitting it
    stop_at = next((i for i, t in enumerate(seq) if t in STOP_IDS), None)
    if stop_at is None:
        assert len(seq) == MAX_NEW
        assert res["token_ids"] == seq
        assert res["finish_reason"] == "length"
    else:
        assert res["token_ids"] == seq[:stop_at]
        assert res["finish_reason"] == "stop"
    assert len(res["token_ids"]) > 3
    assert res["text"] == hf_tokenizer.decode(res["token_ids"], skip_special_tokens=True)
    assert res["timings"]["prompt_tokens"] == len(ref_prompt)
    assert res["timings"]["generation_tokens"] == len(res["token_ids"])
    if prompt.startswith("What is 2"):
        assert "4" in res["text"]
