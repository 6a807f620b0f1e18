"""Rotary position embedding tables (Su et al. 2021, RoFormer), as the host feeds them to every graph.

numpy only, so that running a bundle needs no torch. The graphs take positions as cos/sin tables
(docs/graph-contract.md); the float reference (:mod:`qwen_ondevice.core.modeling`) uses these same tables.
"""

from __future__ import annotations

import numpy as np

from qwen_ondevice.core.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies (D/2,) float32: ``1 / theta^(2i/D)``, i = 0 .. D/2 - 1, computed
    in float64 and rounded once (within a float32 ulp of ``transformers``' own float32 tables)."""
    D = cfg.head_dim
    return (1.0 / (float(cfg.rope_theta) ** (np.arange(0, D, 2, dtype=np.float64) / D))).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for integer ``positions`` (N,): each (N, D/2) float32. The angle is the
    float32 product position x inv_freq (as ``transformers`` forms it); cos and sin of it are
    computed in float64 and rounded once."""
    angles = np.asarray(positions).astype(np.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # (N, D/2) float32
    a = angles.astype(np.float64)
    return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
