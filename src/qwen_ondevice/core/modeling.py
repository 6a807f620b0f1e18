"""The on-device Qwen2 graph (docs/graph-contract.md) in PyTorch: static AR and CL, split into parts.

Letters: AR tokens per call, CL context length, P = CL - AR past length, H hidden, D head_dim,
NH attention heads, KVH KV heads, G = NH / KVH, V vocab, I FFN size.

The layer's arithmetic is :func:`qwen_ondevice.core.layer.decoder_layer`, shared with the ONNX
graphs; this module holds the weights and runs it on torch tensors.

Every module is a pure function of its inputs (no state between calls): the host owns the KV
cache, the positions (given as cos/sin tables) and the additive attention mask. Keys are kept
transposed, ``(KVH, 1, D, P)``; values ``(KVH, 1, P, D)``; a call returns only the AR new entries.

Attention is plain MatMul/Softmax. The 1/sqrt(D) softmax scale (Vaswani et al. 2017) is folded
into q_proj's weight and bias at load time, so the graph multiplies by nothing extra.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen_ondevice.core import rope
from qwen_ondevice.core.checkpoint import WeightStore
from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.layer import decoder_layer
from qwen_ondevice.core.parts import PartSpec, layer_weight_names


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer ``positions`` (N,): each (N, D/2) float32, the host's own tables
    (:func:`qwen_ondevice.core.rope.rope_tables`), so the float reference and every backend agree."""
    cos, sin = rope.rope_tables(cfg, positions.numpy())
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., AR, D) by cos/sin (1, 1, AR, D/2) in the rotate-half layout of Qwen2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) with the fp32 upcast of ``transformers``' Qwen2RMSNorm."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Linear(nn.Module):
    """``y = x @ W^T (+ b)`` with W (out, in) as stored in the checkpoint."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DecoderLayer(nn.Module):
    """One Qwen2 decoder layer with the host-owned KV cache (docs/graph-contract.md)."""

    def __init__(self, cfg: ModelConfig, weights: WeightStore, layer: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        n = layer_weight_names(layer)
        w = lambda role: weights.get(n[role]).to(dtype)  # noqa: E731
        scale = 1.0 / math.sqrt(cfg.head_dim)
        self.input_layernorm = RMSNorm(w("input_layernorm"), cfg.rms_norm_eps)
        self.q_proj = Linear(w("q_proj.weight") * scale, w("q_proj.bias") * scale)
        self.k_proj = Linear(w("k_proj.weight"), w("k_proj.bias"))
        self.v_proj = Linear(w("v_proj.weight"), w("v_proj.bias"))
        self.o_proj = Linear(w("o_proj.weight"))
        self.post_attention_layernorm = RMSNorm(w("post_attention_layernorm"), cfg.rms_norm_eps)
        self.gate_proj = Linear(w("gate_proj.weight"))
        self.up_proj = Linear(w("up_proj.weight"))
        self.down_proj = Linear(w("down_proj.weight"))

    def forward(
        self,
        hidden: torch.Tensor,  # (1, AR, H)
        attention_mask: torch.Tensor,  # (1, 1, AR, CL) additive
        cos: torch.Tensor,  # (1, 1, AR, D/2)
        sin: torch.Tensor,  # (1, 1, AR, D/2)
        past_key: torch.Tensor,  # (KVH, 1, D, P)
        past_value: torch.Tensor,  # (KVH, 1, P, D)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns hidden (1, AR, H), new keys (KVH, 1, D, AR), new values (KVH, 1, AR, D)
        (:func:`qwen_ondevice.core.layer.decoder_layer`)."""
        return decoder_layer(_TorchLayerOps(self, cos, sin), self.cfg, hidden, attention_mask, past_key, past_value)


class _TorchLayerOps:
    """:class:`qwen_ondevice.core.layer.LayerOps` in torch eager, over a :class:`DecoderLayer`'s
    weights and one call's cos/sin tables (1, 1, AR, D/2)."""

    def __init__(self, layer: DecoderLayer, cos: torch.Tensor, sin: torch.Tensor):
        self.layer = layer
        self.cos, self.sin = cos, sin
        self.kv_heads, self.head_dim = layer.cfg.num_key_value_heads, layer.cfg.head_dim

    def rms_norm(self, x, role):
        return getattr(self.layer, role)(x)

    def linear(self, x, role):
        return getattr(self.layer, role)(x)

    def split_heads(self, x, groups, value_output=False):
        return x.view(x.shape[1], self.kv_heads, groups, self.head_dim).permute(1, 2, 0, 3)

    def rope(self, x):
        return apply_rope(x, self.cos, self.sin)

    def center_keys(self, k):
        return k  # the float reference keeps the keys as computed

    def key_output(self, k):
        return k.transpose(-1, -2)

    def concat(self, a, b, axis):
        return torch.cat([a, b], dim=axis)

    def matmul(self, a, b):
        return torch.matmul(a, b)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def silu(self, x):
        return F.silu(x)

    def softmax(self, scores):
        shifted = scores.to(torch.float32)
        shifted = shifted - shifted.amax(-1, keepdim=True)
        return torch.softmax(shifted, dim=-1).to(scores.dtype)

    def merge_heads(self, x):
        kv_heads, groups, ar, d = x.shape
        return x.permute(2, 0, 1, 3).reshape(1, ar, kv_heads * groups * d)


class EmbeddingPart(nn.Module):
    """Part 1: ``input_ids`` (1, AR) int32 -> hidden (1, AR, H)."""

    def __init__(self, cfg: ModelConfig, weights: WeightStore, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.embed_tokens = nn.Parameter(weights.get("model.embed_tokens.weight").to(dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.long(), self.embed_tokens)


class DecoderPart(nn.Module):
    """A contiguous range of decoder layers; the last part adds the final RMSNorm and lm_head.

    forward(hidden (1, AR, H), attention_mask (1, 1, AR, CL), cos, sin (1, 1, AR, D/2),
    past_keys [(KVH, 1, D, P)] * L, past_values [(KVH, 1, P, D)] * L) returns
    (hidden (1, AR, H) or logits (1, AR, V) float, new_keys [(KVH, 1, D, AR)] * L,
    new_values [(KVH, 1, AR, D)] * L).
    """

    def __init__(self, cfg: ModelConfig, weights: WeightStore, layers: range, head: bool, dtype=torch.float32):
        super().__init__()
        self.layer_ids = list(layers)
        self.layers = nn.ModuleList(DecoderLayer(cfg, weights, i, dtype) for i in layers)
        self.head = head
        if head:
            self.norm = RMSNorm(weights.get("model.norm.weight").to(dtype), cfg.rms_norm_eps)
            self.lm_head = Linear(weights.get("lm_head.weight").to(dtype))

    def layers_forward(self, hidden, attention_mask, cos, sin, past_keys, past_values):
        """The decoder layers only: returns (hidden (1, AR, H), new_keys, new_values)."""
        new_keys, new_values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values):
            hidden, nk, nv = layer(hidden, attention_mask, cos, sin, pk, pv)
            new_keys.append(nk)
            new_values.append(nv)
        return hidden, new_keys, new_values

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and lm_head: (1, N, H) -> logits (1, N, V); identity without a head."""
        return self.lm_head(self.norm(hidden)) if self.head else hidden

    def forward(self, hidden, attention_mask, cos, sin, past_keys, past_values):
        hidden, new_keys, new_values = self.layers_forward(hidden, attention_mask, cos, sin, past_keys, past_values)
        return self.head_forward(hidden), new_keys, new_values


def build_part(cfg: ModelConfig, weights: WeightStore, spec: PartSpec, dtype=torch.float32) -> nn.Module:
    """The torch module of one part (EmbeddingPart when it holds no layers)."""
    if spec.embedding and len(spec.layers) == 0:
        return EmbeddingPart(cfg, weights, dtype).eval()
    if spec.embedding:
        raise ValueError("a part holds either the embedding or decoder layers, not both")
    return DecoderPart(cfg, weights, spec.layers, spec.head, dtype).eval()
