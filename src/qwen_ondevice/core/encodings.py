"""Quantization encodings: scale and zero point of a uint8/uint16 activation tensor.

Affine quantization as the ONNX ``QuantizeLinear`` spec defines it:
``q = saturate(round_half_to_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

QMAX = {"uint8": 255, "uint16": 65535}

#: Ops that only rearrange their input's elements: their output carries the input's encoding (it
#: gets no statistics of its own) and, on the host, they can run on the quantized integers.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Split", "Identity", "Squeeze", "Unsqueeze"})
NP = {"uint8": np.uint8, "uint16": np.uint16}


@dataclass(frozen=True)
class Encoding:
    """An asymmetric unsigned encoding. ``lo``/``hi`` are the float range it represents."""

    scale: float
    zero_point: int
    dtype: str  # "uint8" | "uint16"

    @property
    def lo(self) -> float:
        return (0 - self.zero_point) * self.scale

    @property
    def hi(self) -> float:
        return (QMAX[self.dtype] - self.zero_point) * self.scale

    def to_dict(self) -> dict:
        return {**asdict(self), "min": self.lo, "max": self.hi}

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        return cls(float(d["scale"]), int(d["zero_point"]), d["dtype"])

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float -> uint (ONNX QuantizeLinear: round half to even, saturate)."""
        q = np.rint(np.asarray(x, np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, 0, QMAX[self.dtype]).astype(NP[self.dtype])

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """uint -> float32 (ONNX DequantizeLinear)."""
        return ((q.astype(np.int32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)


def encoding_for_range(lo: float, hi: float, dtype: str = "uint16") -> Encoding:
    """The encoding covering [lo, hi] (widened to contain 0 so zero is exact, as QNN requires)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = QMAX[dtype]
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    scale = (hi - lo) / qmax
    zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return Encoding(float(np.float32(scale)), zp, dtype)


def mse_range(values: np.ndarray, lo: float, hi: float, dtype: str, steps: int = 40, min_ratio: float = 0.3) -> tuple[float, float]:
    """Clip the range [lo, hi] to minimise the quantization MSE of ``values`` (a sample).

    Shrinks both ends by a common factor in [min_ratio, 1] and keeps the factor with the lowest
    mean squared error of quantize/dequantize (clipping error plus rounding error).
    """
    x = np.asarray(values, np.float64).ravel()
    best, best_err = (lo, hi), None
    for r in np.linspace(1.0, min_ratio, steps):
        enc = encoding_for_range(lo * r, hi * r, dtype)
        err = float(np.mean((enc.dequantize(enc.quantize(x)) - x) ** 2))
        if best_err is None or err < best_err:
            best, best_err = (lo * r, hi * r), err
    return best


#: The KV cache's dtype in the quantized bundles (w4a16, w8a16): one encoding per layer and
#: tensor, shared by ``past_*_in`` and ``past_*_out`` (docs/numerics.md).
KV_CACHE_DTYPE = "uint8"
#: The cache dtypes a quantized bundle may have (``export --kv-cache``): uint8, the default, or
#: uint16 (twice the cache bytes).
KV_CACHE_DTYPES = ("uint8", "uint16")


def kv_cache_encoding(sample: np.ndarray, lo: float, hi: float, minmax: bool,
                      dtype: str = KV_CACHE_DTYPE) -> tuple[Encoding, str]:
    """The :data:`KV_CACHE_DTYPE` encoding of one layer's keys or values, and a note saying why.

    ``sample``: cache values seen in calibration (any shape); ``lo``/``hi``: their observed range.
    ``minmax`` takes the observed range as it is (centered keys, whose range is narrow already,
    keep the rare tokens with extreme keys, the attention sink among them); otherwise the range is
    clipped to minimise the MSE on the sample (:func:`mse_range`).
    """
    if minmax:
        return encoding_for_range(lo, hi, dtype), f"{dtype} centered keys, observed min/max [{lo:.3g}, {hi:.3g}]"
    clo, chi = mse_range(sample, lo, hi, dtype)
    return (encoding_for_range(clo, chi, dtype),
            f"{dtype} KV, MSE-clipped from [{lo:.3g}, {hi:.3g}] to [{clo:.3g}, {chi:.3g}]")
