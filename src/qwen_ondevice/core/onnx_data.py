"""Reading ONNX initializers, from the graph or from its external-data file: what both the export
(quantization reads the float weights) and the runtime (the host rewrites read the quantized ones)
need, with nothing else of either."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper


def read_initializer(t: TensorProto, base: Path) -> np.ndarray:
    """An initializer's values (float, int8, uint8, uint16), from its external-data file when it has one."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT8: np.int8,
             TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16}[t.data_type]
    arr = np.fromfile(base / info["location"], dtype=np.uint8, count=int(info["length"]), offset=int(info["offset"]))
    return arr.view(dtype).reshape(tuple(t.dims))
