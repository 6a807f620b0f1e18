"""ONNX graphs of the parts (docs/graph-contract.md), written node by node with ``onnx.helper``.

Each part is built twice, for AR-128 (prompt processor) and AR-1 (token generator); both graphs
point their initializers at one external-data file, written once (:class:`ExternalData`). A
decoder layer is :func:`qwen_ondevice.core.layer.decoder_layer`, the float reference's own
definition, run on a graph builder: its ops add plain nodes (MatMul/Softmax attention, no contrib
ops), so ONNX Runtime and the QNN HTP both take every node.

Letters: AR, CL, P = CL - AR, H, D, NH, KVH, G = NH / KVH, I, V (see core/modeling.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_ondevice.core.checkpoint import WeightStore
from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.layer import decoder_layer
from qwen_ondevice.core.onnx_io import IR_VERSION, OPSET, ExternalData, IOSpec, io_signature
from qwen_ondevice.core.parts import PartSpec, key_offset_name, layer_weight_names

class GraphBuilder:
    """Accumulates nodes, inputs, outputs and initializers of one graph.

    ``weight()`` stores big tensors in the part's :class:`ExternalData`; ``const()`` embeds small
    ones in the model. ``op()`` returns the (first) output name of the node it adds.
    """

    def __init__(self, name: str, data: ExternalData, float_type: int):
        self.name = name
        self.data = data
        self.T = float_type
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._init_names: set[str] = set()
        self._n = 0

    @property
    def np_float(self):
        return np.float16 if self.T == TensorProto.FLOAT16 else np.float32

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def weight(self, name: str, array: np.ndarray | Callable[[], np.ndarray], onnx_type: int | None = None) -> str:
        """An initializer stored in the part's external-data file (written once per part).

        ``array`` may be a zero-argument callable giving it: called only when the part's file
        does not hold ``name`` yet, so a weight is read (and rotated, with ``--rotate``) once
        per part, not once per AR graph."""
        if name not in self._init_names:
            if callable(array):
                array = None if name in self.data.entries else array()
            self.initializers.append(self.data.add(name, array, onnx_type))
            self._init_names.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out and n_out == 1 else [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qwen-ondevice")
        m.ir_version = IR_VERSION
        return m


class WeightSource:
    """Float weights of a part, transposed for MatMul and cast to the graph's float type.

    Projections are stored (in, out) so the graph computes ``x @ W``; q_proj's weight and bias
    carry the folded 1/sqrt(D) softmax scale, exactly as modeling.DecoderLayer does.
    """

    def __init__(self, cfg: ModelConfig, weights: WeightStore, np_dtype):
        self.cfg = cfg
        self.w = weights
        self.dtype = np_dtype

    def tensor(self, name: str, transpose: bool = False, scale: float = 1.0) -> np.ndarray:
        t = self.w.get(name)
        if scale != 1.0:
            t = t * scale
        a = t.numpy()
        return np.ascontiguousarray(a.T if transpose else a).astype(self.dtype, copy=False)


def _rms_norm(b: GraphBuilder, x: str, weight_name: str, ws: WeightSource, eps: float) -> str:
    """RMSNorm as one ``SimplifiedLayerNormalization`` node (ONNX Runtime's RMSNorm, computed
    in fp32 internally; the QNN HTP maps it to its fused RmsNorm op). A decomposed
    Mul/ReduceMean/Sqrt chain would square Qwen2's outlier activations inside 16-bit tensors."""
    return b.op("SimplifiedLayerNormalization", [x, b.weight(weight_name, lambda: ws.tensor(weight_name))], axis=-1, epsilon=eps)


def _linear(b: GraphBuilder, x: str, w_name: str, ws: WeightSource, bias_name: str | None = None, scale: float = 1.0) -> str:
    y = b.op("MatMul", [x, b.weight(w_name, lambda: ws.tensor(w_name, transpose=True, scale=scale))])
    if bias_name:
        y = b.op("Add", [y, b.weight(bias_name, lambda: ws.tensor(bias_name, scale=scale))])
    return y


def _rope(b: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """rotate-half RoPE on (..., AR, D) with cos/sin (1, 1, AR, D/2)."""
    x1, x2 = b.op("Split", [x, b.const("split", np.array([half, half], np.int64))], n_out=2, axis=-1)
    a = b.op("Sub", [b.op("Mul", [x1, cos]), b.op("Mul", [x2, sin])])
    c = b.op("Add", [b.op("Mul", [x2, cos]), b.op("Mul", [x1, sin])])
    return b.op("Concat", [a, c], axis=-1)


def shift_by_row_max(b: GraphBuilder, scores: str) -> str:
    """``scores - max(scores, axis=-1)`` (KVH, G, AR, CL): the shift softmax makes internally,
    made explicit so that the softmax input is <= 0 with its maximum at exactly 0.

    Softmax is invariant to it, so the float graph is unchanged. It is there for the NPU: Qwen2's
    attention scores get large (rows attending to the first token), and the HTP's uint16 Softmax
    loses the differences between such large inputs (measured on the HTP simulator, see
    docs/numerics.md). On shifted inputs it only has to resolve [-MASK_MARGIN, 0] (see
    :data:`qwen_ondevice.quantize.qdq.MASK_MARGIN`).
    """
    row_max = b.op("ReduceMax", [scores, b.const("axes", np.array([-1], np.int64))], keepdims=1)  # (KVH, G, AR, 1)
    return b.op("Sub", [scores, row_max])


class _OnnxLayerOps:
    """:class:`qwen_ondevice.core.layer.LayerOps` on a :class:`GraphBuilder`: each op adds its
    nodes to the graph of decoder layer ``layer`` and returns the name of its output.

    ``key_center``: the keys are stored minus a constant vector c (KVH, 1, 1, D), zeros here and
    set by the export's key-centering stage (:mod:`qwen_ondevice.quantize.kv_equalize`). Exact for
    attention: q . (k - c) = q . k - q . c, and q . c is the same for every key of a query's row,
    which softmax ignores. The graph adds the offset -c (:func:`key_offset_name`) rather than
    subtracting c: the HTP truncates where it requantizes a Sub's output, and rounds an Add's
    (with Sub the stored keys came out low on the HTP simulator; docs/numerics.md).
    """

    BIASED = ("q_proj", "k_proj", "v_proj")

    def __init__(self, b: GraphBuilder, cfg: ModelConfig, ws: WeightSource, layer: int, cos: str, sin: str, ar: int,
                 key_center: bool):
        self.b, self.cfg, self.ws, self.layer = b, cfg, ws, layer
        self.cos, self.sin, self.ar = cos, sin, ar
        self.key_center = key_center
        self.names = layer_weight_names(layer)

    def rms_norm(self, x, role):
        return _rms_norm(self.b, x, self.names[role], self.ws, self.cfg.rms_norm_eps)

    def linear(self, x, role):
        bias = self.names[f"{role}.bias"] if role in self.BIASED else None
        scale = 1.0 / math.sqrt(self.cfg.head_dim) if role == "q_proj" else 1.0
        return _linear(self.b, x, self.names[f"{role}.weight"], self.ws, bias, scale=scale)

    def split_heads(self, x, groups, value_output=False):
        b, KVH, D = self.b, self.cfg.num_key_value_heads, self.cfg.head_dim
        x = b.op("Reshape", [x, b.const("shape", np.array([self.ar, KVH, groups, D], np.int64))])
        if not value_output:
            return b.op("Transpose", [x], perm=[1, 2, 0, 3])
        name = f"past_value_{self.layer}_out"
        b.op("Transpose", [x], out=name, perm=[1, 2, 0, 3])
        b.output(name, b.T, (KVH, 1, self.ar, D))
        return name

    def rope(self, x):
        return _rope(self.b, x, self.cos, self.sin, self.cfg.head_dim // 2)

    def center_keys(self, k):
        if not self.key_center:
            return k
        offset = np.zeros((self.cfg.num_key_value_heads, 1, 1, self.cfg.head_dim), self.b.np_float)
        return self.b.op("Add", [k, self.b.weight(key_offset_name(self.layer), offset)])

    def key_output(self, k):
        name = f"past_key_{self.layer}_out"
        self.b.op("Transpose", [k], out=name, perm=[0, 1, 3, 2])
        self.b.output(name, self.b.T, (self.cfg.num_key_value_heads, 1, self.cfg.head_dim, self.ar))
        return name

    def concat(self, a, b, axis):
        return self.b.op("Concat", [a, b], axis=axis)

    def matmul(self, a, b):
        return self.b.op("MatMul", [a, b])

    def add(self, a, b):
        return self.b.op("Add", [a, b])

    def mul(self, a, b):
        return self.b.op("Mul", [a, b])

    def silu(self, x):
        return self.b.op("Mul", [x, self.b.op("Sigmoid", [x])])

    def softmax(self, scores):
        b = self.b
        if b.T != TensorProto.FLOAT:
            scores = b.op("Cast", [scores], to=TensorProto.FLOAT)
        probs = b.op("Softmax", [shift_by_row_max(b, scores)], axis=-1)
        if b.T != TensorProto.FLOAT:
            probs = b.op("Cast", [probs], to=b.T)
        return probs

    def merge_heads(self, x):
        b = self.b
        shape = (1, self.ar, self.cfg.hidden_size)
        return b.op("Reshape", [b.op("Transpose", [x], perm=[2, 0, 1, 3]), b.const("shape", np.array(shape, np.int64))])


def build_part_graph(cfg: ModelConfig, weights: WeightStore, part: PartSpec, ar: int, cl: int,
                     data: ExternalData, precision: str = "fp32",
                     key_center: bool = False) -> tuple[onnx.ModelProto, list[IOSpec], list[IOSpec]]:
    """The ONNX model of ``part`` at AR ``ar`` and CL ``cl``, with its I/O signature.

    I/O (docs/graph-contract.md): part 1 ``input_ids`` (1, AR) int32 -> ``hidden_states_0``
    (1, AR, H); a decoder part with layers [a, b) ``hidden_states_{a}``, ``attention_mask`` (1, 1, AR, CL),
    ``position_ids_cos``/``_sin`` (1, 1, AR, D/2), ``past_key_{l}_in`` (KVH, 1, D, P),
    ``past_value_{l}_in`` (KVH, 1, P, D) -> ``hidden_states_{b}`` or ``logits`` (1, AR, V),
    ``past_key_{l}_out`` (KVH, 1, D, AR), ``past_value_{l}_out`` (KVH, 1, AR, D).
    Float tensors are float32 (``fp32``) or float16 (``fp16``). ``key_center`` adds each layer's
    key-center subtraction (see :class:`_OnnxLayerOps`; the quantized exports use it).
    """
    T = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    b = GraphBuilder(f"{part.name}_ar{ar}_cl{cl}", data, T)
    ws = WeightSource(cfg, weights, b.np_float)
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    if part.embedding:
        ids = b.input("input_ids", TensorProto.INT32, (1, ar))
        table = b.weight("model.embed_tokens.weight", lambda: ws.tensor("model.embed_tokens.weight"))
        b.op("Gather", [table, ids], out=part.hidden_out, axis=0)
        b.output(part.hidden_out, T, (1, ar, H))
    else:
        P = cl - ar
        hidden = b.input(part.hidden_in, T, (1, ar, H))
        mask = b.input("attention_mask", T, (1, 1, ar, cl))
        cos = b.input("position_ids_cos", T, (1, 1, ar, D // 2))
        sin = b.input("position_ids_sin", T, (1, 1, ar, D // 2))
        KVH = cfg.num_key_value_heads
        for layer in part.layers:
            past_key = b.input(f"past_key_{layer}_in", T, (KVH, 1, D, P))
            past_value = b.input(f"past_value_{layer}_in", T, (KVH, 1, P, D))
            ops = _OnnxLayerOps(b, cfg, ws, layer, cos, sin, ar, key_center)
            hidden, _, _ = decoder_layer(ops, cfg, hidden, mask, past_key, past_value)
            weights.release()  # the layer's pages of the memory map stop counting in RSS
        if part.head:
            x = _rms_norm(b, hidden, "model.norm.weight", ws, cfg.rms_norm_eps)
            b.op("MatMul", [x, b.weight("lm_head.weight", lambda: ws.tensor("lm_head.weight", transpose=True))], out="logits")
            b.output("logits", T, (1, ar, V))
        else:
            b.op("Identity", [hidden], out=part.hidden_out)
            b.output(part.hidden_out, T, (1, ar, H))
    # Order the outputs: hidden/logits first, then the KV outputs by layer.
    b.outputs.sort(key=lambda vi: (vi.name.startswith("past_"), _kv_order(vi.name)))
    model = b.model()
    return model, io_signature(b.inputs), io_signature(b.outputs)


def _kv_order(name: str) -> tuple[int, int]:
    if not name.startswith("past_"):
        return (0, 0)
    parts = name.split("_")
    return (int(parts[2]), 0 if parts[1] == "key" else 1)
