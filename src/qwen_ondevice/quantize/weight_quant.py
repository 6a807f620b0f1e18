"""Symmetric per-output-channel weight quantization (int4 / int8) with error-minimising clipping.

Weights are in the graph's MatMul layout W (K, N): K input features, N output channels. Each
output channel n gets one scale s_n; q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1) with zero
point 0, and the graph computes x @ (q * s).

Methods:
- ``mse``: per channel, the clipping ratio alpha in [0.5, 1] (s = alpha * max|W[:, n]| / qmax)
  that minimises the expected output error sum_k E[x_k^2] (W_kn - s q_kn)^2, with E[x_k^2]
  measured on the calibration text (the diagonal of the layer's input Hessian; the objective of
  Nagel et al. 2020, "Up or Down? Adaptive Rounding", under a diagonal approximation).
- ``gptq``: the same scales, then GPTQ's column-by-column rounding with error feedback through
  the inverse Hessian of the layer inputs (Frantar et al. 2022, "GPTQ", Algorithm 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class QuantizedWeight:
    """q (K, N) int8 storage of int4/int8 values; scale (N,) float32 per output channel, or
    (K / B, N) per block of B input rows when ``block_size`` is set; bits 4 or 8; and the
    relative output error ``rel_error`` = sum E[x^2](W - Wq)^2 / sum E[x^2] W^2 (measured)."""

    q: np.ndarray
    scale: np.ndarray
    bits: int
    rel_error: float
    block_size: int | None = None

    def row_scales(self) -> np.ndarray:
        """The scale of every element, (K, N) or broadcastable (1, N)."""
        if self.block_size is None:
            return self.scale[None, :]
        return np.repeat(self.scale, self.block_size, axis=0)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.row_scales()


def _qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


#: Elements of the weight searched at once by :func:`mse_scales`: every channel (block) is searched
#: on its own, so a chunk that stays in the CPU's cache gives the same scales bit for bit, and the
#: 24-point search, which streams its input through memory about 7 times per point, runs from cache.
MSE_CHUNK_ELEMENTS = 1 << 21


def mse_scales(w: torch.Tensor, bits: int, act_sq: torch.Tensor, grid: int = 24, min_ratio: float = 0.5) -> torch.Tensor:
    """Scales minimising sum_k act_sq[k] (w - s q)^2 per output channel over clipping ratios.

    w (K, N) float32 with act_sq (K,) gives per-channel scales (N,); w (G, B, N) with act_sq
    (G, B) gives one scale per block of B input rows and channel, (G, N). The ratios are ``grid``
    points from 1 down to ``min_ratio`` of the channel's (block's) absolute maximum.
    """
    if w.dim() == 3:  # independent blocks: searched a cache-sized chunk of blocks at a time
        step = max(1, MSE_CHUNK_ELEMENTS // (w.shape[1] * w.shape[2]))
        return torch.cat([_search_scales(w[g:g + step], bits, act_sq[g:g + step], grid, min_ratio)
                          for g in range(0, w.shape[0], step)])
    step = max(1, MSE_CHUNK_ELEMENTS // w.shape[0])  # independent channels
    return torch.cat([_search_scales(w[:, c:c + step], bits, act_sq, grid, min_ratio) for c in range(0, w.shape[1], step)])


def _search_scales(w: torch.Tensor, bits: int, act_sq: torch.Tensor, grid: int, min_ratio: float) -> torch.Tensor:
    """:func:`mse_scales` over one chunk, all its channels (blocks) at once."""
    qmin, qmax = _qrange(bits)
    absmax = w.abs().amax(dim=-2).clamp_min(1e-12)  # (N,) or (G, N)
    best_s = absmax / qmax
    best_err = torch.full_like(absmax, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid):
        s = absmax * r / qmax
        d = w / s.unsqueeze(-2)
        d.round_().clamp_(qmin, qmax).mul_(s.unsqueeze(-2)).sub_(w).square_()  # (w - deq)^2
        err = torch.einsum("...k,...kn->...n", act_sq, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


#: LPBQ block scales: a float scale per output channel times an unsigned 4-bit integer per
#: block, in [1, LPBQ_LEVELS] (Qualcomm's low-power block quantization, as AIMET exports it: the
#: "4 -> 8 bit expansion" of the block scale; QNN's QNN_QUANTIZATION_ENCODING_BLOCKWISE_EXPANSION).
LPBQ_LEVELS = 16


def lpbq_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Block scales (K / B, N) snapped to the LPBQ grid: per channel c_n = max_b s_bn / 16 and
    s_bn' = c_n * clamp(round(s_bn / c_n), 1, 16), so the HTP can store each block scale as a
    4-bit integer multiple of the channel's float scale (exact in float32: k has at most 5 bits).
    The largest block scale of each channel is unchanged; smaller ones move by at most c_n / 2."""
    c = blocks.amax(dim=0, keepdim=True) / LPBQ_LEVELS  # (1, N)
    k = torch.clamp(torch.round(blocks / c), 1, LPBQ_LEVELS)
    return (c * k).to(torch.float32)


@dataclass
class HessianFactor:
    """What GPTQ needs from a layer input's Hessian H = sum x x^T (K, K), computed once and shared
    by every weight that reads the same input (q/k/v; gate/up): the act-order permutation (K,)
    and the upper Cholesky factor (K, K) of the damped, permuted H^-1 (Frantar et al. 2022)."""

    perm: torch.Tensor
    hinv: torch.Tensor
    dead: torch.Tensor


def hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> HessianFactor:
    """The :class:`HessianFactor` of H = sum x x^T (K, K).

    The upper Cholesky factor U of the permuted H^-1 (H^-1 = U^T U) is computed without forming
    H^-1: with J the order reversal, J H J = M M^T (lower Cholesky M) gives H = R R^T with
    R = J M J upper, so U = R^-1 = J M^-1 J, one Cholesky and one triangular inverse
    (2K^3/3 flops, where Cholesky, inverse from it and Cholesky again take 4K^3/3). At most two
    K x K float32 arrays (plus a quarter-size block) are alive at once: 1.4 GB each for
    Qwen2-7B's down_proj input (K = 18944)."""
    with warnings.catch_warnings():  # a read-only memory map (PartStats.load): only read here
        warnings.simplefilter("ignore", UserWarning)
        H = torch.from_numpy(np.asarray(hessian, np.float32))
    dead = torch.diag(H) == 0
    # "act-order": quantize the input features with the largest Hessian diagonal first
    diag = torch.diag(H).clone()
    diag[dead] = 1
    perm = torch.argsort(diag, descending=True)
    rev = perm.flip(0)
    H = H[rev[:, None], rev]  # J H_perm J, a new array: the caller's Hessian is never written
    d = H.diagonal()
    d[dead[rev]] = 1
    d += damp * torch.mean(d)
    M = torch.linalg.cholesky(H)
    del H, d
    Minv = _lower_triangular_inverse(M)
    del M
    return HessianFactor(perm, Minv.flip(0, 1), dead)


def _lower_triangular_inverse(L: torch.Tensor, out: torch.Tensor | None = None, base: int = 256) -> torch.Tensor:
    """L^-1 for a lower triangular L (K, K), by halves: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], each product a triangular solve (K^3/3 flops in all, as
    LAPACK's trtri, which torch does not expose)."""
    K = L.shape[0]
    if out is None:
        out = torch.zeros_like(L)
    if K <= base:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(K, dtype=L.dtype), upper=False))
        return out
    k = K // 2
    _lower_triangular_inverse(L[:k, :k], out[:k, :k], base)
    _lower_triangular_inverse(L[k:, k:], out[k:, k:], base)
    x = torch.linalg.solve_triangular(L[k:, k:], L[k:, :k], upper=False)  # C^-1 B
    out[k:, :k] = torch.linalg.solve_triangular(L[:k, :k], x, upper=False, left=False).neg_()  # -C^-1 B A^-1
    return out


#: Output channels quantized per call of :func:`_quantize_columns`: every channel's scale and
#: rounding depend only on its own column (and, for GPTQ, on the shared Hessian), so a wide
#: weight (Qwen2-7B's lm_head: 3584 x 152064, 2.2 GB in float32) is processed in column blocks
#: whose temporaries stay near COLUMN_BLOCK_ELEMENTS * 4 bytes each, not the whole weight's size.
COLUMN_BLOCK_ELEMENTS = 1 << 25


def quantize_weight(
    w: np.ndarray, bits: int, act_sq: np.ndarray | None = None, hessian: "np.ndarray | HessianFactor | None" = None,
    method: str = "mse", damp: float = 0.01, block: int = 128, block_size: int | None = None,
    column_block: int | None = None,
) -> QuantizedWeight:
    """Quantize W (K, N) float32 to ``bits`` (4 or 8): per output channel, or per block of
    ``block_size`` input rows within each output channel (block-wise, "LPBQ-style" grouping).

    ``act_sq`` (K,) is E[x_k^2] of the layer input (uniform when None); ``hessian`` (K, K) is
    sum x x^T (or its :class:`HessianFactor`), needed by ``gptq``. With blocks, GPTQ keeps the
    block scales fixed from the start ("static groups"), so act-order stays valid. Output channels
    are processed ``column_block`` at a time (default: :data:`COLUMN_BLOCK_ELEMENTS` / K), which
    bounds the temporaries without changing any result.

    Raises:
        ValueError: an unknown method, gptq without a Hessian, or K not a multiple of block_size.
    """
    if method not in ("mse", "gptq"):
        raise ValueError(f"unknown weight method {method!r}")
    if method == "gptq" and hessian is None:
        raise ValueError("gptq needs the input Hessian")
    W = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    K, N = W.shape
    if block_size is not None and K % block_size:
        raise ValueError(f"input size {K} is not a multiple of the block size {block_size}")
    a = torch.ones(K) if act_sq is None else torch.from_numpy(np.asarray(act_sq, np.float32))
    factor = None
    if method == "gptq":
        factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, damp)
    step = column_block or max(1, COLUMN_BLOCK_ELEMENTS // K)
    q = np.empty((K, N), np.int8)
    scale = np.empty((N,) if block_size is None else (K // block_size, N), np.float32)
    num = den = 0.0
    for c0 in range(0, N, step):
        c1 = min(c0 + step, N)
        qc, sc, n_err, d_err = _quantize_columns(W[:, c0:c1], bits, a, factor, block, block_size)
        q[:, c0:c1], scale[..., c0:c1] = qc, sc
        num, den = num + n_err, den + d_err
    return QuantizedWeight(q, scale, bits, float(num / max(den, 1e-30)), block_size)


def _quantize_columns(W: torch.Tensor, bits: int, a: torch.Tensor, factor: "HessianFactor | None", block: int,
                      block_size: int | None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Quantize the output channels W (K, n): returns q (K, n) int8, the scales ((n,) or
    (K / B, n)), and the sums of E[x^2](W - Wq)^2 and E[x^2] W^2 over these channels."""
    K = W.shape[0]
    if block_size is None:
        s = mse_scales(W, bits, a)  # (n,)
        blocks = None
    else:
        G = K // block_size
        blocks = lpbq_scales(mse_scales(W.reshape(G, block_size, -1), bits, a.reshape(G, block_size)))  # (K / B, n)
        s = blocks.repeat_interleave(block_size, dim=0)  # (K, n)
    qmin, qmax = _qrange(bits)
    q = torch.clamp(torch.round(W / s), qmin, qmax) if factor is None else _gptq(W, s, factor, qmin, qmax, block)
    num = float((a[:, None] * (W - q * s) ** 2).sum())
    den = float((a[:, None] * W**2).sum())
    return q.to(torch.int8).numpy(), (s if blocks is None else blocks).numpy().astype(np.float32), num, den


def _gptq(W: torch.Tensor, s: torch.Tensor, f: HessianFactor, qmin: int, qmax: int, block: int) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022, Alg. 1) on W (K, N) with fixed scales s: (N,) per channel or
    (K, N) per element (block-wise).

    Rows of W (input features) are quantized in act-order; the rounding error of each row is
    spread over the rows not yet quantized through the upper Cholesky factor of H^-1.
    """
    W = W.clone()
    W[f.dead, :] = 0
    W = W[f.perm]
    S = s[f.perm] if s.dim() == 2 else s.expand(W.shape[0], -1)  # (K, N), in act-order
    Hinv = f.hinv
    K = W.shape[0]
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[i]
            sr = S[i1 + i]
            q = torch.clamp(torch.round(w / sr), qmin, qmax)
            Q1[i] = q
            err = (w - q * sr) / Hb[i, i]
            W1[i:].addr_(Hb[i, i:], err, alpha=-1)
            E1[i] = err
        Q[i1:i2] = Q1
        W[i2:].addmm_(Hinv[i1:i2, i2:].T, E1, alpha=-1)  # in place: no (K, N) temporary to write and read back
    out = torch.empty_like(Q)
    out[f.perm] = Q
    return out
