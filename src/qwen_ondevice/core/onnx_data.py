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


#: Bytes the HTP keeps per LPBQ block scale. ONNX Runtime's QNN EP turns an int4
#: DequantizeLinear with per-block float scales into QNN's BLOCKWISE_EXPANSION encoding
#: (``ConvertBlockQuantScalesToLpbq``, onnxruntime qnn_utils.cc): one float scale per output
#: channel and one integer scale (1..16) per block, stored in 8 bits. Measured on the .bin files
#: of onnxruntime-qnn 2.7.0 (docs/numerics.md, "Bytes per token").
LPBQ_BLOCK_SCALE_BYTES = 1
#: Bytes the .bin spends per output channel of a quantized weight (its scale and offset in QNN's
#: encoding), from the same measurement: 18 with LPBQ blocks, about 17.3 with one scale per channel.
CHANNEL_SCALE_BYTES = 18
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
         TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.FLOAT16: 16, TensorProto.FLOAT: 32,
         TensorProto.INT32: 32, TensorProto.INT64: 64}


def device_weight_bytes(model) -> int:
    """Bytes the HTP stores for a quantized graph's weights (computed from the initializers'
    shapes, no data read): each DequantizeLinear'd weight at its own width (int4 half a byte,
    int8 one), plus :data:`CHANNEL_SCALE_BYTES` per output channel and
    :data:`LPBQ_BLOCK_SCALE_BYTES` per block when it has block scales, its all-zero zero points
    not at all; a weight's scale that is itself a quantized tensor (the embedding's uint16 row
    scales) and every other initializer at its ONNX size. The .bin adds a graph description
    (tens of KB to about a MB) that this does not count.

    model: an ``onnx.ModelProto`` (external data need not be loaded). Raises ValueError for an
    initializer type it does not know.
    """
    inits = {t.name: t for t in model.graph.initializer}

    def numel(t) -> int:
        n = 1
        for d in t.dims:
            n *= d
        return n

    def nbytes(t) -> int:
        if t.data_type not in _BITS:
            raise ValueError(f"initializer {t.name}: ONNX type {t.data_type} has no known width")
        return (numel(t) * _BITS[t.data_type] + 7) // 8

    counted: set[str] = set()
    total = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[0] in counted:
            continue
        w, scale = inits[node.input[0]], inits.get(node.input[1])
        counted.update(x for x in node.input if x)
        total += nbytes(w)
        if scale is None or numel(scale) <= 1:
            continue
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(len(w.dims), 1)
        if block:  # scale (K / B, N): N channel scales, K / B * N block scales
            channels = numel(w) // w.dims[axis]
            total += channels * CHANNEL_SCALE_BYTES + numel(scale) * LPBQ_BLOCK_SCALE_BYTES
        else:
            total += numel(scale) * CHANNEL_SCALE_BYTES
    return total + sum(nbytes(t) for name, t in inits.items() if name not in counted)
