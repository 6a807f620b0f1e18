"""Shared fixtures: tiny random Qwen2 checkpoints (seconds) and the real demo model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

#: Real English text for prompts (WikiText-2 validation split, read where it lies; never copied
#: into the repository). ``QWEN_ONDEVICE_TEXT`` points elsewhere.
# Real text on disk: the repository's ../shared copy of WikiText-2 when present, else the same
# file as shipped inside the package.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
_SHIPPED = Path(__file__).resolve().parents[1] / "src" / "qwen_ondevice" / "data" / "wikitext2_valid.txt"
TEXT_FILE = Path(os.environ.get("QWEN_ONDEVICE_TEXT", _SHARED if _SHARED.exists() else _SHIPPED))


def real_text(chars: int = 20000, offset: int = 0) -> str:
    """``chars`` characters of real text from :data:`TEXT_FILE`, starting at ``offset``."""
    with open(TEXT_FILE, encoding="utf-8") as f:
        text = f.read(offset + chars)[offset:]
    assert len(text) == chars, f"{TEXT_FILE} is shorter than {offset + chars} characters"
    return text


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory):
    """A folder for one test module's exports, deleted once the module's tests are done.

    A demo bundle is GBs; kept until the end of the session, the suite's bundles would add up to
    several times the disk its largest module needs.
    """
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_checkpoint():
    """The real demo model (Qwen2.5-Coder-0.5B-Instruct), assembled and converted once."""
    from qwen_ondevice.core.checkpoint import load_checkpoint

    return load_checkpoint("demo")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_checkpoint):
    """Our tokenizer wrapper over the demo model's own tokenizer files."""
    return demo_checkpoint.load_tokenizer()


@pytest.fixture(scope="session")
def hf_tokenizer(demo_checkpoint):
    """``transformers``' own tokenizer of the demo model, loaded independently of our wrapper."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_checkpoint.path))


@pytest.fixture(scope="session")
def demo_hf_model(demo_checkpoint):
    """The independent reference: ``transformers``' Qwen2ForCausalLM of the demo model, fp32."""
    return demo_checkpoint.load_transformers_model()


@pytest.fixture(scope="session")
def text_ids(hf_tokenizer):
    """A few thousand token ids of real text (tokenized by transformers' tokenizer)."""
    ids = hf_tokenizer.encode(real_text(20000), add_special_tokens=False)
    assert len(ids) > 2000
    return ids


def make_tiny_checkpoint(folder: Path, tokenizer_src: Path, *, tied: bool = False, layers: int = 3,
                         heads: int = 4, kv_heads: int = 2, hidden: int = 64, ffn: int = 128,
                         seed: int = 0, max_positions: int = 4096, rope_theta: float = 10000.0) -> Path:
    """Write a random Qwen2 checkpoint with transformers' own classes and the demo tokenizer.

    Weights are drawn with std 0.1 (biases too), so activations are far from zero and the
    comparisons against transformers mean something.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    vocab = 151936
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        rope_theta=rope_theta, rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.1,
        bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copy(tokenizer_src / f, folder / f)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "bos_token_id": 151643}))
    return folder


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, demo_checkpoint):
    """Returns make(**kwargs) -> Path of a tiny random checkpoint (cached per kwargs)."""
    made = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            folder = tmp_path_factory.mktemp("tiny")
            made[key] = make_tiny_checkpoint(folder, demo_checkpoint.path, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_path(tiny_factory):
    return tiny_factory()


def one_line_error(capsys, argv) -> str:
    """Run the CLI; assert exit 2 and a single ``error:`` line on stderr; return that line."""
    from qwen_ondevice.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def wait_for_server(proc, timeout: float = 60.0) -> tuple[str, dict]:
    """(base URL, /health JSON) of a ``qwen-ondevice serve --port 0`` child started with
    ``stderr=PIPE``: the URL read from its "... on http://127.0.0.1:PORT/v1" line, then /health
    polled until it answers."""
    import re
    import time

    import httpx

    url = None
    for line in proc.stderr:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            url = m.group(1)
            break
    assert url, "serve did not say where it listens"
    deadline = time.monotonic() + timeout
    while True:
        try:
            return url, httpx.get(url + "/health", timeout=5).json()
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "serve did not answer /health"
            time.sleep(0.1)
