"""The on-device Qwen2 decoder layer, written once over a small set of ops.

:func:`decoder_layer` is the one definition of the layer's arithmetic (docs/graph-contract.md):
the float reference runs it on torch tensors (:mod:`qwen_ondevice.core.modeling`), and the export
runs it on an ONNX graph builder (:mod:`qwen_ondevice.export.onnx_graph`), where each op adds its
nodes in the order the layer calls them. Neither torch nor onnx is imported here.

Letters: AR tokens per call, CL context length, P = CL - AR past length, H hidden, D head_dim,
KVH KV heads, G = NH / KVH query heads per KV head, I FFN size.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from qwen_ondevice.core.config import ModelConfig

T = TypeVar("T")

#: The seven projections of a decoder layer (the MatMul weights ``model.layers.N.<attn|mlp>.<kind>.weight``).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LayerOps(Protocol[T]):
    """The ops :func:`decoder_layer` is written in, over one layer's weights.

    ``T`` is the tensor type of the implementation (a torch tensor, or the name of an ONNX value).
    Shapes are given for the layer's use; every op computes in the layer's float type unless it
    says otherwise.
    """

    def rms_norm(self, x: T, role: str) -> T:
        """RMSNorm (Zhang & Sennrich 2019) of ``x`` (1, AR, H) over H, in fp32 internally, times the
        weight of ``role`` (``input_layernorm`` or ``post_attention_layernorm``)."""

    def linear(self, x: T, role: str) -> T:
        """``x @ W^T (+ b)`` for the projection ``role`` (``q_proj`` ... ``down_proj``), with the
        bias where Qwen2 has one (q/k/v). q_proj's weight and bias carry the folded 1/sqrt(D)
        softmax scale (Vaswani et al. 2017), so attention multiplies by nothing extra."""

    def split_heads(self, x: T, groups: int, value_output: bool = False) -> T:
        """(1, AR, KVH*groups*D) -> (KVH, groups, AR, D). ``value_output``: ``x`` is the layer's
        new values, which leave the graph as its ``past_value_{l}_out``."""

    def rope(self, x: T) -> T:
        """Rotate ``x`` (KVH, G or 1, AR, D) by the call's cos/sin tables (1, 1, AR, D/2), in the
        rotate-half layout of Qwen2."""

    def center_keys(self, k: T) -> T:
        """The keys (KVH, 1, AR, D) as stored: minus the layer's key center where the graph has
        one (:mod:`qwen_ondevice.quantize.kv_equalize`; exact for attention), else unchanged."""

    def key_output(self, k: T) -> T:
        """The new keys transposed to the cache layout: (KVH, 1, AR, D) -> (KVH, 1, D, AR), the
        graph's ``past_key_{l}_out``."""

    def concat(self, a: T, b: T, axis: int) -> T:
        """``a`` then ``b`` along ``axis``."""

    def matmul(self, a: T, b: T) -> T:
        """Batched matrix product over the last two axes."""

    def add(self, a: T, b: T) -> T:
        """Elementwise sum, broadcast."""

    def mul(self, a: T, b: T) -> T:
        """Elementwise product, broadcast."""

    def silu(self, x: T) -> T:
        """``x * sigmoid(x)`` (Elfwing et al. 2018), elementwise."""

    def softmax(self, scores: T) -> T:
        """Softmax of ``scores`` (KVH, G, AR, CL) over CL, in fp32, after subtracting each row's
        maximum (exact for softmax; the NPU's uint16 softmax then only resolves [-margin, 0],
        docs/numerics.md); returned in the layer's float type."""

    def merge_heads(self, x: T) -> T:
        """(KVH, G, AR, D) -> (1, AR, H), heads in q_proj's output order."""


def decoder_layer(ops: LayerOps[T], cfg: ModelConfig, hidden: T, attention_mask: T, past_key: T,
                  past_value: T) -> tuple[T, T, T]:
    """One Qwen2 decoder layer with the host-owned KV cache (docs/graph-contract.md).

    Args:
        ops: the ops over this layer's weights and the call's RoPE tables.
        cfg: the model's config (KV heads and query groups).
        hidden: the residual stream (1, AR, H).
        attention_mask: additive (1, 1, AR, CL): 0 where a query sees a slot, a large negative
            number elsewhere.
        past_key: the cached keys (KVH, 1, D, P), transposed.
        past_value: the cached values (KVH, 1, P, D).

    Returns:
        hidden (1, AR, H), the new keys (KVH, 1, D, AR) and the new values (KVH, 1, AR, D). The
        cache slots of the keys and values are the host's to place.
    """
    G = cfg.num_key_value_groups
    x = ops.rms_norm(hidden, "input_layernorm")
    q = ops.linear(x, "q_proj")  # (1, AR, NH*D), pre-scaled
    k = ops.linear(x, "k_proj")  # (1, AR, KVH*D)
    v = ops.linear(x, "v_proj")
    q = ops.split_heads(q, G)  # (KVH, G, AR, D)
    k = ops.split_heads(k, 1)  # (KVH, 1, AR, D)
    new_value = ops.split_heads(v, 1, value_output=True)  # (KVH, 1, AR, D)
    q = ops.rope(q)
    k = ops.rope(k)
    new_key = ops.key_output(ops.center_keys(k))  # (KVH, 1, D, AR)

    keys = ops.concat(past_key, new_key, axis=3)  # (KVH, 1, D, CL)
    values = ops.concat(past_value, new_value, axis=2)  # (KVH, 1, CL, D)
    scores = ops.add(ops.matmul(q, keys), attention_mask)  # (KVH, G, AR, CL)
    probs = ops.softmax(scores)
    attn = ops.merge_heads(ops.matmul(probs, values))  # (1, AR, H)
    hidden = ops.add(hidden, ops.linear(attn, "o_proj"))

    x = ops.rms_norm(hidden, "post_attention_layernorm")
    gate = ops.linear(x, "gate_proj")  # (1, AR, I)
    up = ops.linear(x, "up_proj")
    act = ops.mul(ops.silu(gate), up)
    hidden = ops.add(hidden, ops.linear(act, "down_proj"))
    return hidden, new_key, new_value
