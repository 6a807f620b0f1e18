"""Write a Hugging Face checkpoint shaped exactly like Qwen2-7B-Instruct, with seeded random weights.

    PYTHONPATH=src python benchmarks/make_qwen2_7b_checkpoint.py OUT [--layers N] [--seed S] [--tokenizer DIR]

The shapes, config and generation config are Qwen2-7B-Instruct's published ones (hidden 3584, 28
layers, 28 heads, 4 KV heads, head_dim 128, FFN 18944, vocab 152064, rope_theta 1e6, untied
lm_head, q/k/v biases, bfloat16), the weights bf16 in 4 safetensors shards with
``model.safetensors.index.json``, as the real checkpoint is laid out. ``--layers`` keeps the
first N decoder layers (a 7B-wide slice for tests and quick measurements; the shards stay 4).
The tokenizer is the demo model's (Qwen2 and Qwen2.5 share it), or ``--tokenizer DIR``.

Weights are drawn per tensor (normal, std 0.02 as the config's initializer_range; norms 1, biases
std 0.02) and written one shard at a time, so peak memory is about one shard (~3.8 GB at 28
layers), not the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: Qwen2-7B-Instruct's config.json as published (Hugging Face Qwen/Qwen2-7B-Instruct).
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
#: Its generation_config.json as published.
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                     "transformers_version": "4.41.2"}
SHARDS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen2ForCausalLM checkpoint with ``cfg``, in the checkpoint's order."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = H // cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"] * D
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.q_proj.bias", (H,)),
                (p + "self_attn.k_proj.weight", (KV, H)), (p + "self_attn.k_proj.bias", (KV,)),
                (p + "self_attn.v_proj.weight", (KV, H)), (p + "self_attn.v_proj.bias", (KV,)),
                (p + "self_attn.o_proj.weight", (H, H)),
                (p + "post_attention_layernorm.weight", (H,)),
                (p + "mlp.gate_proj.weight", (I, H)), (p + "mlp.up_proj.weight", (I, H)),
                (p + "mlp.down_proj.weight", (H, I))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def split_shards(shapes: list[tuple[str, tuple[int, ...]]], n: int) -> list[list[str]]:
    """Consecutive tensors split into ``n`` shards of about equal bytes (none empty)."""
    sizes = [2 * _numel(s) for _, s in shapes]
    target, shards, acc = sum(sizes) / n, [[]], 0
    for (name, _), size in zip(shapes, sizes):
        if acc >= target * len(shards) and len(shards) < n:
            shards.append([])
        shards[-1].append(name)
        acc += size
    while len(shards) < n:  # fewer tensors than shards' worth of bytes: split the last ones
        big = max(range(len(shards)), key=lambda k: len(shards[k]))
        shards.insert(big + 1, [shards[big].pop()])
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(out: Path, layers: int = 28, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """Write the checkpoint into ``out`` (created); returns ``out``."""
    import torch
    from safetensors.torch import save_file

    cfg = {**CONFIG, "num_hidden_layers": layers, "max_window_layers": layers}
    shapes = tensor_shapes(cfg)
    shape_of = dict(shapes)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    groups = split_shards(shapes, SHARDS)
    for k, names in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        t0 = time.perf_counter()
        tensors = {}
        for name in names:
            shape = shape_of[name]
            if "norm" in name:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, cfg["initializer_range"], generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        print(f"{fname}: {len(names)} tensors, {time.perf_counter() - t0:.1f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    if tokenizer is None:
        from qwen_ondevice.core.checkpoint import load_checkpoint

        tokenizer = load_checkpoint("demo").path
    for f in TOKENIZER_FILES:
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, out / f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers to keep (default 28, the whole model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer.json (default: the demo model's)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    write_checkpoint(args.out, args.layers, args.seed, args.tokenizer)
    print(f"wrote {args.out} ({args.layers} layers) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
