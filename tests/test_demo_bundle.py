"""The real demo model exported to an fp32 bundle and run on ONNX Runtime (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_ondevice.cli.main import main
from qwen_ondevice.export.options import ExportOptions
from qwen_ondevice.export.pipeline import export
from qwen_ondevice.runtime.open_model import open_runtime

PROMPT = "Write a Python function that returns the n-th Fibonacci number."


@pytest.fixture(scope="module")
def demo_fp32_bundle(demo_checkpoint, module_dir):
    out = module_dir / "fp32"
    export(ExportOptions(model="demo", precision="fp32", context_length=1024, eval_tokens=0), out)
    return out


@pytest.fixture(scope="module")
def hf_model(demo_checkpoint):
    return demo_checkpoint.load_transformers_model()


def test_demo_bundle_logits_match_transformers(demo_fp32_bundle, hf_model, demo_checkpoint):
    rt = open_runtime(str(demo_fp32_bundle))
    text = open_text()
    ids = demo_checkpoint.load_tokenizer().encode(text)[:40]
    assert len(ids) == 40
    got = rt.engine.logits_all(ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 1e-3


def test_demo_bundle_greedy_equals_transformers_generate(demo_fp32_bundle, hf_model, hf_tokenizer, capsys):
    assert main(["--quiet", "generate", str(demo_fp32_bundle), "--prompt", PROMPT, "--max-new-tokens", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "ort-cpu"
    ref_prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    if hasattr(ref_prompt, "keys"):
        ref_prompt = ref_prompt["input_ids"]
    assert out["prompt_ids"] == list(ref_prompt)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ref_prompt]), do_sample=False, max_new_tokens=32)[0, len(ref_prompt):].tolist()
    assert len(out["token_ids"]) == 32
    assert out["token_ids"] == ref


def open_text() -> str:
    from conftest import real_text

    return real_text(4000)
