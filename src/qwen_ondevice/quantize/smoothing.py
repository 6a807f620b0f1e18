"""Activation smoothing of the MLP down_proj input, folded into up_proj (exact in float).

Qwen2's down_proj input ``act = SiLU(gate) * up`` (1, AR, I) carries a few channels with massive
values (hundreds to thousands) while most are below 1. One uint16 encoding per tensor then
spends its levels on those channels and rounds the ordinary ones coarsely; on the demo model this
single tensor is most of the w8a16 perplexity loss (measured by removing its Q/DQ pair alone).

SmoothQuant (Xiao et al. 2023, "SmoothQuant", eq. 4) migrates the range into the weights with a
per-channel scale ``s_j = max|act_j|^alpha / max|W_down[j, :]|^(1 - alpha)``:
``act' = act / s`` and ``W_down'[j, :] = s_j W_down[j, :]``. Because ``act_j`` is linear in
``up_j``, ``1/s_j`` is folded into up_proj's output channel j (``W_up'[:, j] = W_up[:, j] / s_j``;
Qwen2's up_proj has no bias), so no op is added and the float model is unchanged. The calibration
statistics of the two rescaled tensors (per-channel ranges, E[x^2], Hessian) are rescaled the same
way, so no second calibration pass is needed.
"""

from __future__ import annotations

import numpy as np

from qwen_ondevice.quantize.calibrate import TensorStats


def smoothing_scales(act_absmax: np.ndarray, w_rowmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel scales s (I,) float32 of SmoothQuant eq. 4.

    ``act_absmax`` (I,) is max|act_j| over the calibration tokens, ``w_rowmax`` (I,) is
    max_n |W_down[j, n]| (W_down in MatMul layout (I, H)). Channels never active get s = 1.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.maximum(np.asarray(w_rowmax, np.float64), 1e-8)
    s = np.where(a > 0, np.power(np.maximum(a, 1e-8), alpha) / np.power(w, 1.0 - alpha), 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth_mlp(
    w_up: np.ndarray, w_down: np.ndarray, act: TensorStats, up_out: TensorStats, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold SmoothQuant scales into up_proj / down_proj; returns (w_up', w_down', s).

    w_up (H, I) and w_down (I, H) float32 are in MatMul layout (the graph computes ``x @ W``).
    ``act`` (the down_proj input) and ``up_out`` (up_proj's output) need ``channel_lo`` and
    ``channel_hi`` (I,); they are rescaled in place: ranges, E[x^2] sums and the Hessian of ``act``.

    Raises:
        ValueError: the statistics lack per-channel ranges (a calibration made before smoothing).
    """
    if act.channel_lo is None or up_out.channel_lo is None:
        raise ValueError("smoothing needs per-channel ranges of the down_proj input and the up_proj output")
    absmax = np.maximum(np.abs(act.channel_lo), np.abs(act.channel_hi))
    s = smoothing_scales(absmax, np.abs(w_down).max(axis=1), alpha)  # (I,)
    w_up = (w_up / s[None, :]).astype(np.float32)
    w_down = (w_down * s[:, None]).astype(np.float32)
    for st in (act, up_out):
        st.channel_lo = st.channel_lo / s
        st.channel_hi = st.channel_hi / s
        st.lo, st.hi = float(st.channel_lo.min()), float(st.channel_hi.max())
    if act.channel_sumsq is not None:
        act.channel_sumsq = act.channel_sumsq / (s.astype(np.float64) ** 2)
    if act.hessian is not None:
        inv = (1.0 / s).astype(np.float32)
        act.hessian = act.hessian * inv[:, None] * inv[None, :]
    return w_up, w_down, s
