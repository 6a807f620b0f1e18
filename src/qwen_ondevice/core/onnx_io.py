"""ONNX building blocks shared by the export (graphs of the parts) and the quantizer (their QDQ
rewrite): the opset and IR version, the one external-data file per part, and the I/O signature."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

OPSET = 21
IR_VERSION = 10
NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int64): TensorProto.INT64,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
              np.dtype(np.uint16): TensorProto.UINT16}
ONNX_TO_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT32: "int32",
                TensorProto.INT64: "int64", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
                TensorProto.UINT16: "uint16", TensorProto.INT4: "int4"}
ALIGN = 64  # byte alignment of each tensor in the external-data file


class ExternalData:
    """One part's external-data file: each named tensor is appended once and referenced by
    every graph of the part (offset/length in the ``external_data`` fields of the ONNX spec)."""

    def __init__(self, path: Path):
        self.path = path
        self.location = path.name
        self.entries: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}  # name -> (offset, length, type, dims)
        self._f = open(path, "wb")
        self._pos = 0

    def add(self, name: str, array: np.ndarray, onnx_type: int | None = None, dims: tuple[int, ...] | None = None) -> TensorProto:
        """Write ``array`` (once per name) and return an initializer that points at it.

        ``onnx_type``/``dims`` override the array's own (for int4, ``array`` holds packed bytes);
        ``array`` may be None for a name already written."""
        if name not in self.entries:
            raw = np.ascontiguousarray(array)  # written from its own buffer: no bytes copy of a 2 GB lm_head
            pad = (-self._pos) % ALIGN
            self._f.write(b"\0" * pad)
            self._pos += pad
            t = onnx_type or NP_TO_ONNX[array.dtype]
            self.entries[name] = (self._pos, raw.nbytes, t, tuple(dims if dims is not None else array.shape))
            self._f.write(raw.reshape(-1).view(np.uint8))
            self._pos += raw.nbytes
        offset, length, t, dims = self.entries[name]
        tensor = TensorProto(name=name, data_type=t, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(length for _, length, _, _ in self.entries.values())

    def close(self) -> None:
        self._f.close()


@dataclass
class IOSpec:
    """One graph input/output: name, static shape, dtype name (``float32``, ``uint8``...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def io_signature(values: list[onnx.ValueInfoProto]) -> list[IOSpec]:
    """The :class:`IOSpec` of each graph input or output (static shapes)."""
    out = []
    for vi in values:
        t = vi.type.tensor_type
        out.append(IOSpec(vi.name, tuple(d.dim_value for d in t.shape.dim), ONNX_TO_NAME[t.elem_type]))
    return out
