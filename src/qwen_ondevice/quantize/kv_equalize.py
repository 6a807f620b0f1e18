"""Key-cache equalization and centering (both exact in float): per-RoPE-pair scales folded into
q_proj and k_proj, and a per-channel constant subtracted from the stored keys.

Qwen2's keys carry a few channel pairs with very large values (k_proj biases; on the demo model
keys reach +-145 while most channels stay within +-10). The uint8 KV cache has one encoding per
layer, so those pairs set the step and the ordinary channels keep a handful of levels.

Attention only needs ``q . k``. RoPE rotates channel j with channel j + D/2 (rotate-half), so
scaling both channels of a pair by the same factor commutes with it: with ``k' = k / s`` and
``q' = q * s`` per pair, ``q' . k' = q . k`` exactly, before and after RoPE. The scales balance
the two sides, as SmoothQuant does for activations and weights (Xiao et al. 2023, eq. 4, with
alpha = 0.5): ``s = sqrt(max|k pair| / max|q pair|)``, where a pair's magnitude is the rotation-
invariant norm ``sqrt(x_j^2 + x_{j+D/2}^2)`` and the query side is the maximum over the query
heads of the KV group. Afterwards both sides of a pair share the same maximum, so the
equalization is idempotent (re-running it on equalized weights finds scales of 1).

The scales are folded into the columns of the float graph's q_proj/k_proj weights and biases
(MatMul layout (H, heads * D)), in the part's external-data file, before calibration.

Centering subtracts from the keys after RoPE their per-channel midrange c over the same tokens
(the graph adds its ``key_offset`` initializer, -c): softmax ignores the constant ``q . c`` it
removes from each row of scores (see :func:`equalize_part`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from qwen_ondevice.core.parts import key_offset_name


def pair_norm_max(absmax: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """(heads * D,) per-channel max|x| -> (heads, D/2) bound on the pair norm sqrt(x_j^2 + x_{j+D/2}^2)."""
    a = np.asarray(absmax, np.float64).reshape(heads, head_dim)
    half = head_dim // 2
    return np.sqrt(a[:, :half] ** 2 + a[:, half:] ** 2)


def key_scales(q_absmax: np.ndarray, k_absmax: np.ndarray, kv_heads: int, groups: int, head_dim: int) -> np.ndarray:
    """Per-pair scales s (KVH, D/2) float32: keys are divided by s, queries multiplied by it.

    ``q_absmax`` (KVH * G * D,) and ``k_absmax`` (KVH * D,) are per-channel max|x| of the q_proj
    and k_proj outputs (bias included, before RoPE) over calibration tokens; query head h * G + g
    belongs to KV head h (Qwen2's grouped-query layout).
    """
    mk = pair_norm_max(k_absmax, kv_heads, head_dim)  # (KVH, D/2)
    mq = pair_norm_max(q_absmax, kv_heads * groups, head_dim).reshape(kv_heads, groups, -1).max(axis=1)
    s = np.sqrt(np.maximum(mk, 1e-6) / np.maximum(mq, 1e-6))
    return np.clip(s, 1e-3, 1e3).astype(np.float32)


def channel_scales(s: np.ndarray, repeat: int) -> np.ndarray:
    """(KVH, D/2) pair scales -> (KVH * repeat * D,) per output channel (both halves of a head,
    ``repeat`` heads per KV head)."""
    full = np.concatenate([s, s], axis=1)  # (KVH, D)
    return np.repeat(full[:, None, :], repeat, axis=1).reshape(-1)


def _rewrite(t: TensorProto, base: Path, fn) -> None:
    """Apply ``fn`` to a float32 external-data initializer, in place in its data file."""
    info = {e.key: e.value for e in t.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(base / info["location"], "r+b") as f:
        f.seek(offset)
        a = np.frombuffer(f.read(length), np.float32).reshape(tuple(t.dims))
        out = np.ascontiguousarray(fn(a), np.float32)
        f.seek(offset)
        f.write(out.tobytes())


def qk_output_names(model: onnx.ModelProto, layers: range) -> dict[int, tuple[str, str]]:
    """layer -> (q_proj output, k_proj output) tensor names (after the bias Add) in a float graph."""
    out = {}
    adds = {n.input[1]: n.output[0] for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2}
    for l in layers:
        p = f"model.layers.{l}.self_attn."
        out[l] = (adds[p + "q_proj.bias"], adds[p + "k_proj.bias"])
    return out


def equalize_part(graph_path: Path, layers: range, absmax: dict[str, np.ndarray], kv_heads: int, groups: int,
                  head_dim: int, key_ranges: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                  scale: bool = True, center: bool = True) -> dict[str, dict]:
    """Fold key scales into every layer of one float part and set its key centers, in place;
    returns a report per layer.

    ``graph_path`` is one of the part's float graphs (its initializers name the shared data file);
    ``absmax`` maps the q/k output names of :func:`qk_output_names` to per-channel max|x|;
    ``key_ranges`` maps a layer to the per-channel (KVH * D,) min and max of its stored keys
    (``past_key_{l}_out``, after RoPE and the current center), measured on the same tokens.

    Centering (``center``): the graph stores ``RoPE(k) + o`` with the offset o = -c
    (core.parts.key_offset_name), c the per-channel midrange of the keys. q . c is one constant per query row, which softmax
    ignores, so attention is unchanged in float. It matters on the device: Qwen2's keys share a
    large common part (k_proj biases), which makes the raw attention scores large against their
    spread within a row, and the HTP computes q . k with a small relative error that such scores
    turn into a large absolute one; centered, the scores and the uint8 key range shrink (the
    measurements are in docs/numerics.md). o is updated as ``(o - midrange) / s``, so a re-run
    on a finished part changes nothing.
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    names = qk_output_names(model, layers)
    base = graph_path.parent
    report = {}
    for l in layers:
        q_name, k_name = names[l]
        s = key_scales(absmax[q_name], absmax[k_name], kv_heads, groups, head_dim) if scale \
            else np.ones((kv_heads, head_dim // 2), np.float32)
        sk, sq = channel_scales(s, 1), channel_scales(s, groups)
        p = f"model.layers.{l}.self_attn."
        entry = {}
        if scale:
            mk = pair_norm_max(absmax[k_name], kv_heads, head_dim)
            _rewrite(inits[p + "k_proj.weight"], base, lambda w: w / sk[None, :])
            _rewrite(inits[p + "k_proj.bias"], base, lambda b: b / sk)
            _rewrite(inits[p + "q_proj.weight"], base, lambda w: w * sq[None, :])
            _rewrite(inits[p + "q_proj.bias"], base, lambda b: b * sq)
            entry = {"key_pair_max_before": float(mk.max()), "key_pair_max_after": float((mk / s).max()),
                     "scale_min": float(s.min()), "scale_max": float(s.max())}
        if key_ranges is not None:
            lo, hi = (np.asarray(x, np.float64) for x in key_ranges[l])  # (KVH * D,)
            entry["key_absmax_before"] = float(np.maximum(np.abs(lo), np.abs(hi)).max())
            lo_s, hi_s = lo / sk, hi / sk
            if center:
                mid = (lo + hi) / 2
                shape = (kv_heads, 1, 1, head_dim)
                _rewrite(inits[key_offset_name(l)], base, lambda o: (o - mid.reshape(shape)) / sk.reshape(shape))
                entry["key_absmax_after"] = float(((hi_s - lo_s) / 2).max())
                entry["center_absmax"] = float(np.abs(mid / sk).max())
            else:
                entry["key_absmax_after"] = float(np.maximum(np.abs(lo_s), np.abs(hi_s)).max())
        report[f"model.layers.{l}"] = entry
    return report
