"""The QDQ rewrite: a float part graph -> the quantized graph of docs/numerics.md.

Every float activation gets a QuantizeLinear/DequantizeLinear pair with its encoding (uint16;
uint8 for the KV cache), except the float residual stream; the graph's own inputs and outputs
become the quantized tensors themselves (uint16 hidden states, mask, cos, sin, logits; uint8 KV),
named as in docs/graph-contract.md. Decoder projection weights become ``DequantizeLinear(int4 or
int8 weight (K, N), scale (N,), explicit zero point (N,) of the same type, axis=1)`` feeding the
MatMul: one scale per output channel (or, for int4 blocks of B input rows, ``axis=0``,
``block_size`` B and scale and zero point (K / B, N)), and the explicit INT4 zero point the HTP
needs to decode negative int4 values. The embedding table is int8 with one scale per row (the rows
and their uint16 scales are gathered separately and multiplied, a form the HTP takes); norm
weights and biases are uint16 per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_ondevice.core.encodings import DATA_MOVEMENT, KV_CACHE_DTYPE, Encoding, encoding_for_range, kv_cache_encoding
from qwen_ondevice.core.onnx_data import read_initializer
from qwen_ondevice.core.onnx_io import IR_VERSION, OPSET, ExternalData, IOSpec, io_signature
from qwen_ondevice.quantize.calibrate import PartStats, is_row_max_shift
from qwen_ondevice.quantize.weight_quant import QuantizedWeight

SOFTMAX_ENCODING = Encoding(1.0 / 65535, 0, "uint16")
#: Below the smallest attention score seen in calibration by this margin, a masked score is
#: clipped: exp(-20) ~ 2e-9 of weight per masked slot, so even 4096 masked slots add < 1e-5.
MASK_MARGIN = 20.0
ONNX_U = {"uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int4 values (any int array in [-8, 7]) two per byte, low nibble first (ONNX spec)."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    lo = flat[0::2].astype(np.uint8) & 0x0F
    hi = flat[1::2].astype(np.uint8) & 0x0F
    return (lo | (hi << 4)).astype(np.uint8)


@dataclass
class ActivationEncodings:
    """Encodings of every float activation of a part, by tensor name, plus why each range was
    chosen (``notes``) for the manifest."""

    enc: dict[str, Encoding]
    notes: dict[str, str]


def widen_range(lo: float, hi: float, factor: float) -> tuple[float, float]:
    """[lo, hi] scaled by ``factor`` about its centre, still containing 0."""
    c, h = (lo + hi) / 2, (hi - lo) / 2 * factor
    return min(c - h, 0.0), max(c + h, 0.0)


def activation_encodings(model: onnx.ModelProto, stats: PartStats, mask_value: float,
                         down_proj_headroom: float = 1.0, key_minmax: bool = False,
                         kv_dtype: str = KV_CACHE_DTYPE) -> ActivationEncodings:
    """Choose the encoding of every float tensor of ``model`` (the float AR graph).

    - calibrated tensors: uint16 covering the observed [min, max] (outlier channels included:
      uint16's 65536 levels keep Qwen2's massive activations and the ordinary ones both);
    - the MLP down_proj input ``SiLU(gate) * up``: the observed range widened ``down_proj_headroom``
      times about its centre. It is a product of two activations and heavy-tailed, so min/max over
      the calibration tokens underestimates what later text reaches (measured on the demo model,
      docs/numerics.md), and clipping it costs more than the resolution a wider uint16 range
      gives up;
    - KV cache (``past_*``): ``kv_dtype`` (uint8 by default) per layer, the range clipped to minimise MSE on a sample of
      the cache values; ``past_*_in`` and ``past_*_out`` of a layer share it. With ``key_minmax``
      (centered keys, :mod:`qwen_ondevice.quantize.kv_equalize`) the keys take their observed min/max
      instead: centered, their range is already narrow, and MSE clipping on a random sample
      clips the rare tokens with extreme keys, the attention-sink first token among them (the
      demo's mean KL with each choice: docs/numerics.md);
    - mask: [mask_value, 0]; cos/sin: [-1, 1]; Softmax output: [0, 1];
    - scores + mask: [min score - MASK_MARGIN, max score] (masked entries clipped on purpose);
      their row max takes the same encoding, and scores minus row max (the Softmax input, see
      :func:`qwen_ondevice.export.onnx_graph.shift_by_row_max`) [-MASK_MARGIN, 0]: an entry further
      below its row's max weighs less than exp(-20) ~ 2e-9 of it, so clipping it changes nothing
      the uint16 Softmax output (step 1.5e-5) can show, and the step is 3e-4;
    - data-movement outputs inherit their input's encoding;
    - the op that computes a key or value (the key offset Add, the v_proj bias Add) and the
      Reshape/Transpose between it and ``past_*_out`` take the cache's uint8 encoding: the
      data movement then moves uint8 as it is. With a uint16 tensor there, the HTP requantizes
      to uint8 by truncation where ONNX Runtime rounds, so the stored keys and values come out
      low against the CPU run (HTP simulator measurements: docs/numerics.md).
    """
    enc: dict[str, Encoding] = {}
    notes: dict[str, str] = {}
    st = stats.tensors
    producers = {o: n for n in model.graph.node for o in n.output}
    for name, s in st.items():
        if name.startswith("past_"):
            sample = np.concatenate(s.sample) if s.sample else np.array([s.lo, s.hi])
            enc[name], notes[name] = kv_cache_encoding(sample, s.lo, s.hi, key_minmax and name.startswith("past_key"), kv_dtype)
        else:
            enc[name] = encoding_for_range(s.lo, s.hi, "uint16")
    if down_proj_headroom != 1.0:
        for node in model.graph.node:
            if node.op_type == "MatMul" and ".mlp.down_proj." in node.input[1] and node.input[0] in st:
                s = st[node.input[0]]
                lo, hi = widen_range(s.lo, s.hi, down_proj_headroom)
                enc[node.input[0]] = encoding_for_range(lo, hi, "uint16")
                notes[node.input[0]] = f"down_proj input: observed [{s.lo:.3g}, {s.hi:.3g}] widened {down_proj_headroom:g}x to [{lo:.3g}, {hi:.3g}]"
    for i in model.graph.input:
        n = i.name
        if n.startswith("past_"):
            enc[n] = enc[n.replace("_in", "_out")]
        elif n == "attention_mask":
            enc[n] = encoding_for_range(mask_value, 0.0, "uint16")
        elif n.startswith("position_ids_"):
            enc[n] = encoding_for_range(-1.0, 1.0, "uint16")
    for node in model.graph.node:
        out = node.output
        if node.op_type == "Softmax":
            enc[out[0]] = SOFTMAX_ENCODING
        elif node.op_type == "Concat" and any(i.startswith("past_") for i in node.input):
            kv_in = next(i for i in node.input if i.startswith("past_"))
            enc[out[0]] = enc[kv_in]
        elif node.op_type == "Add" and "attention_mask" in node.input:
            scores = next(i for i in node.input if i != "attention_mask")
            s = st[scores]
            enc[out[0]] = encoding_for_range(s.lo - MASK_MARGIN, s.hi, "uint16")
            notes[out[0]] = f"scores+mask clipped below at min score - {MASK_MARGIN}"
        elif node.op_type == "ReduceMax":  # the row max of the scores: one of its input's values
            enc[out[0]] = enc[node.input[0]]
        elif is_row_max_shift(node, producers):
            enc[out[0]] = encoding_for_range(-MASK_MARGIN, 0.0, "uint16")
            notes[out[0]] = f"scores minus their row max: [-{MASK_MARGIN:g}, 0] (lower entries clipped on purpose)"
        elif node.op_type in DATA_MOVEMENT:
            for o in out:
                if o not in enc:
                    enc[o] = enc[node.input[0]]
    users: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    for o in model.graph.output:
        if not o.name.startswith("past_"):
            continue
        chain, node = [], producers.get(o.name)
        while node is not None and node.op_type in ("Transpose", "Reshape") and users.get(node.input[0]) == 1:
            chain.append(node.input[0])
            node = producers.get(node.input[0])
        if chain and node is not None and node.op_type not in DATA_MOVEMENT and node.op_type != "Concat":
            for t in chain:
                enc[t] = enc[o.name]
                notes[t] = f"the {enc[o.name].dtype} encoding of {o.name} (computed straight into the cache's encoding)"
    return ActivationEncodings(enc, notes)


class _QdqWriter:
    """The nodes and initializers of one QDQ graph as :func:`quantize_graph` builds it: each
    constant written once, big tensors to the part's external data, and ``rename`` mapping each
    float tensor to the dequantized tensor its consumers read."""

    def __init__(self, encodings: dict[str, Encoding], data: ExternalData, outputs: set[str]):
        self.encodings = encodings
        self.data = data
        self.outputs = outputs
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.rename: dict[str, str] = {}
        self._written: set[str] = set()

    def const(self, name: str, arr: np.ndarray, onnx_type: int | None = None) -> str:
        """An inline initializer (scales, zero points), written once; returns its name."""
        if name not in self._written:
            if onnx_type == TensorProto.INT4:
                t = helper.make_tensor(name, TensorProto.INT4, list(arr.shape), pack_int4(arr).tobytes(), raw=True)
            else:
                t = numpy_helper.from_array(arr, name)
            self.inits.append(t)
            self._written.add(name)
        return name

    def big(self, name: str, arr: np.ndarray, onnx_type: int | None = None, dims=None) -> str:
        """An initializer of 1 KiB or more in the external data (inline below that), written
        once; ``dims`` is the logical shape of packed int4 ``arr``."""
        if name not in self._written:
            if arr.nbytes >= 1024:
                self.inits.append(self.data.add(name, arr, onnx_type, dims))
            elif onnx_type == TensorProto.INT4:
                self.inits.append(helper.make_tensor(name, TensorProto.INT4, list(dims), arr.tobytes(), raw=True))
            else:
                self.inits.append(numpy_helper.from_array(arr, name))
            self._written.add(name)
        return name

    def keep(self, t: TensorProto) -> None:
        """An initializer copied as it is (integer tensors)."""
        self.inits.append(t)
        self._written.add(t.name)

    def enc_consts(self, t: str, e: Encoding) -> tuple[str, str]:
        """The scale and zero point initializers of tensor ``t``'s encoding ``e``."""
        return (self.const(f"{t}.scale", np.array(e.scale, np.float32)),
                self.const(f"{t}.zero_point", np.array(e.zero_point, {"uint8": np.uint8, "uint16": np.uint16}[e.dtype])))

    def dequantize(self, src: str, scale: str, zero_point: str, name: str, **attrs) -> None:
        """``name_dq = DequantizeLinear(src)``; consumers of ``name`` read it from now on."""
        self.nodes.append(helper.make_node("DequantizeLinear", [src, scale, zero_point], [name + "_dq"],
                                           name=name + "_DQ", **attrs))
        self.rename[name] = name + "_dq"

    def graph_input(self, i: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        """A float graph input becomes its quantized tensor, dequantized inside; others stay."""
        t = i.type.tensor_type
        if t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return i
        e = self.encodings[i.name]
        s, z = self.enc_consts(i.name, e)
        self.dequantize(i.name, s, z, i.name)
        return helper.make_tensor_value_info(i.name, ONNX_U[e.dtype], [d.dim_value for d in t.shape.dim])

    def projection_weight(self, name: str, qw: QuantizedWeight) -> None:
        """A MatMul weight (K, N): int4 or int8 with an explicit zero point, per output channel
        (axis 1) or per block of input rows (axis 0, ``block_size``)."""
        K, N = qw.q.shape
        zshape = qw.scale.shape  # (N,) or (K / B, N)
        if qw.bits == 4:
            qname = self.big(name + ".q", pack_int4(qw.q), TensorProto.INT4, (K, N))
            zp = self.big(name + ".zero_point", pack_int4(np.zeros(zshape, np.int8)), TensorProto.INT4, zshape)
        else:
            qname = self.big(name + ".q", qw.q.astype(np.int8))
            zp = self.big(name + ".zero_point", np.zeros(zshape, np.int8))
        sc = self.big(name + ".scale", qw.scale.astype(np.float32))
        attrs = {"axis": 1} if qw.block_size is None else {"axis": 0, "block_size": qw.block_size}
        self.dequantize(qname, sc, zp, name, **attrs)

    def embedding_table(self, name: str, w: np.ndarray) -> tuple[str, str, Encoding]:
        """An embedding table (V, H): int8 rows and their uint16 scales (see _embedding_lookup)."""
        q, scale = int8_rows(w)
        row_enc = _row_scale_encoding(scale)
        return self.big(name + ".q", q), self.big(name + ".row_scale.q", row_enc.quantize(scale)[:, None]), row_enc

    def small_float(self, name: str, w: np.ndarray) -> None:
        """A norm weight or bias: uint16 per tensor."""
        e = encoding_for_range(float(w.min()), float(w.max()), "uint16")
        qname = self.big(name + ".q", e.quantize(w))
        s, z = self.enc_consts(name, e)
        self.dequantize(qname, s, z, name)

    def quantize_output(self, o: str) -> None:
        """Q/DQ after the float tensor ``o`` (written as ``o_f`` when ``o`` is a graph output,
        whose name then goes to the quantized tensor); consumers read ``o_dq``."""
        s, z = self.enc_consts(o, self.encodings[o])
        src = o + "_f" if o in self.outputs else o
        qname = o if o in self.outputs else o + "_q"
        self.nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [qname], name=o + "_Q"))
        self.dequantize(qname, s, z, o)

    def copy_node(self, node: onnx.NodeProto) -> None:
        """``node`` reading the dequantized tensors, a graph output written as ``<output>_f``."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(self.rename.get(i, i) for i in node.input)
        del new.output[:]
        new.output.extend(o + "_f" if o in self.outputs else o for o in node.output)
        self.nodes.append(new)


def quantize_graph(
    model: onnx.ModelProto,
    float_base: Path,
    encodings: dict[str, Encoding],
    weights: dict[str, QuantizedWeight],
    data: ExternalData,
    float_tensors: frozenset[str] = frozenset(),
) -> tuple[onnx.ModelProto, list[IOSpec], list[IOSpec]]:
    """Rewrite the float ``model`` (initializers in ``float_base``) into its QDQ form.

    Every float activation gets a QuantizeLinear/DequantizeLinear pair, except the tensors in
    ``float_tensors`` (the residual stream, :func:`residual_stream`), which their consumers read
    as they are: float32 on the host, fp16 on the HTP.

    ``weights`` maps MatMul weight initializer names to their quantized values; the embedding
    table (a Gather's data) becomes int8 per row; other float initializers uint16 per tensor.
    Big tensors go to ``data`` (shared by the part's graphs); scales and zero points are inline.

    Raises:
        KeyError: a float activation has no encoding (calibration missed it).
    """
    g = model.graph
    writer = _QdqWriter(encodings, data, {o.name for o in g.output})
    new_inputs = [writer.graph_input(i) for i in g.input]

    gather_tables = {n.input[0] for n in g.node if n.op_type == "Gather"}
    embedding: dict[str, tuple[str, str, Encoding]] = {}
    for name, t in ((t.name, t) for t in g.initializer):
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            writer.keep(t)
        elif name in weights:
            writer.projection_weight(name, weights[name])
        elif name in gather_tables:
            embedding[name] = writer.embedding_table(name, read_initializer(t, float_base).astype(np.float32))
        else:
            writer.small_float(name, read_initializer(t, float_base).astype(np.float32))

    for node in g.node:
        if node.op_type == "Gather" and node.input[0] in embedding:
            writer.nodes.extend(_embedding_lookup(node, *embedding[node.input[0]], writer.const, writer.rename, writer.outputs))
            writer.quantize_output(node.output[0])
            continue
        writer.copy_node(node)
        for o in node.output:
            if o not in float_tensors:
                writer.quantize_output(o)

    new_outputs = [helper.make_tensor_value_info(o.name, ONNX_U[encodings[o.name].dtype],
                                                 [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in g.output]
    graph = helper.make_graph(_prune_unused(writer.nodes, new_outputs), g.name, new_inputs, new_outputs, writer.inits)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qwen-ondevice")
    out.ir_version = IR_VERSION
    return out, io_signature(list(graph.input)), io_signature(list(graph.output))


def int8_rows(w: np.ndarray, rows_per_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of ``w`` (V, H): returns q (V, H) int8 and scale (V,) float32 with
    ``w ~ q * scale[:, None]``. Rows are rounded ``rows_per_block`` at a time, so the temporaries
    stay a block's size (Qwen2-7B's embedding is 152064 x 3584: 2.2 GB in float32)."""
    V = w.shape[0]
    q = np.empty(w.shape, np.int8)
    scale = np.empty(V, np.float32)
    for r0 in range(0, V, rows_per_block):
        blk = np.asarray(w[r0 : r0 + rows_per_block], np.float32)
        s = np.maximum(np.abs(blk).max(axis=1), 1e-12) / 127.0
        q[r0 : r0 + rows_per_block] = np.clip(np.rint(blk / s[:, None]), -127, 127)
        scale[r0 : r0 + rows_per_block] = s
    return q, scale


def _row_scale_encoding(scale: np.ndarray) -> Encoding:
    """uint16 per-tensor encoding of an embedding table's per-row scales (all positive)."""
    return encoding_for_range(0.0, float(scale.max()), "uint16")


def _embedding_lookup(node: onnx.NodeProto, q_table: str, scale_table: str, scale_enc: Encoding, const, rename: dict,
                      outputs: set[str]) -> list[onnx.NodeProto]:
    """The embedding Gather with per-row int8 scales, in a form the QNN HTP takes.

    The HTP rejects a per-axis DequantizeLinear feeding a Gather, so the rows and their scales
    are gathered separately and multiplied: ``Gather(DQ(int8 table, scale 1)) *
    Gather(DQ(uint16 row scales))``. The int8 values travel exactly; the row scales are uint16
    (relative error below max_scale / 131070 per row), so the numerics stay those of the
    per-row int8 table. Writes the product to the Gather's own output (or ``<output>_f`` when
    it is a graph output) for the caller's QuantizeLinear.
    """
    name = q_table.removesuffix(".q")
    one, zero8 = const("embedding.unit.scale", np.array(1.0, np.float32)), const("embedding.unit.zero_point", np.array(0, np.int8))
    ss = const(scale_table + ".scale", np.array(scale_enc.scale, np.float32))
    sz = const(scale_table + ".zero_point", np.array(scale_enc.zero_point, np.uint16))
    ids = rename.get(node.input[1], node.input[1])
    out = node.output[0] + "_f" if node.output[0] in outputs else node.output[0]
    mk = helper.make_node
    return [
        mk("DequantizeLinear", [q_table, one, zero8], [name + ".int_dq"], name=name + ".int_DQ"),
        mk("Gather", [name + ".int_dq", ids], [name + ".rows"], name=name + ".rows_Gather", axis=0),
        mk("QuantizeLinear", [name + ".rows", one, zero8], [name + ".rows_q"], name=name + ".rows_Q"),
        mk("DequantizeLinear", [name + ".rows_q", one, zero8], [name + ".rows_dq"], name=name + ".rows_DQ"),
        mk("DequantizeLinear", [scale_table, ss, sz], [name + ".row_scale_dq"], name=name + ".row_scale_DQ"),
        mk("Gather", [name + ".row_scale_dq", ids], [name + ".scales"], name=name + ".scales_Gather", axis=0),
        mk("QuantizeLinear", [name + ".scales", ss, sz], [name + ".scales_q"], name=name + ".scales_Q"),
        mk("DequantizeLinear", [name + ".scales_q", ss, sz], [name + ".scales_dq"], name=name + ".scales_DQ"),
        mk("Mul", [name + ".rows_dq", name + ".scales_dq"], [out], name=name + ".dequantize_Mul"),
    ]


def _prune_unused(nodes: list[onnx.NodeProto], outputs) -> list[onnx.NodeProto]:
    """Drop DequantizeLinear nodes nobody reads (e.g. the DQ after a graph output's Q)."""
    used = {o.name for o in outputs}
    for n in nodes:
        used.update(n.input)
    return [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]


def residual_stream(model: onnx.ModelProto, hidden_in: str | None) -> list[str]:
    """The residual stream of a decoder part's float graph: the outputs of its residual Adds
    (two per layer, attention then MLP), in order, without a graph output.

    Found by walking from the part's boundary input ``hidden_in``
    (:attr:`qwen_ondevice.core.parts.PartSpec.hidden_in`): each residual Add reads the stream as its
    first input (:func:`qwen_ondevice.core.layer.decoder_layer`). Empty for a graph without that input (the embedding).
    """
    g = model.graph
    if hidden_in is None or hidden_in not in {i.name for i in g.input}:
        return []
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    stream, t = [], hidden_in
    while True:
        adds = [n for n in consumers.get(t, []) if n.op_type == "Add" and n.input[0] == t]
        if len(adds) != 1 or adds[0].output[0] in outputs:
            return stream
        t = adds[0].output[0]
        stream.append(t)


def check_quantized_graph(model: onnx.ModelProto, projection_weights: set[str],
                          float_tensors: frozenset[str] = frozenset()) -> list[str]:
    """Check the produced model, not the config: returns a list of problems (empty when fine).

    - every projection MatMul reads its weight through a DequantizeLinear with axis 1, a scale
      of one value per output channel and an explicit zero point of the weight's type;
    - every float input of a compute node comes from a DequantizeLinear, and every float output
      of a compute node goes only into QuantizeLinear nodes (no float-only island), except the
      tensors of ``float_tensors`` (the declared float residual stream), which must not reach a
      graph output unquantized.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    init = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    problems = []
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for idx, i in enumerate(n.input):
            p = producer.get(i)
            if i in init or p is None:
                if i in init and init[i].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    problems.append(f"{n.name} ({n.op_type}) reads float initializer {i}")
                continue
            if p.op_type != "DequantizeLinear" and i not in float_tensors:
                problems.append(f"{n.name} ({n.op_type}) input {i} comes from {p.op_type}, not DequantizeLinear")
            if n.op_type == "MatMul" and idx == 1 and p.input[0].removesuffix(".q") in projection_weights:
                q, s, z = (init.get(x) for x in p.input[:3])
                axis = next((a.i for a in p.attribute if a.name == "axis"), 1)
                bsize = next((a.i for a in p.attribute if a.name == "block_size"), 0)
                if q is None or s is None or z is None:
                    problems.append(f"{n.name}: weight DequantizeLinear lacks a constant weight/scale/zero point")
                    continue
                per_channel = axis == 1 and not bsize and list(s.dims) == [q.dims[1]]
                per_block = axis == 0 and bsize and list(s.dims) == [q.dims[0] // bsize, q.dims[1]]
                if not (per_channel or per_block):
                    problems.append(f"{n.name}: weight {p.input[0]} scale shape {list(s.dims)} is not one per output channel ({q.dims[1]})")
                if z.data_type != q.data_type:
                    problems.append(f"{n.name}: zero point type {z.data_type} differs from weight type {q.data_type}")
        for o in n.output:
            if o in float_tensors:
                if o in graph_outputs:
                    problems.append(f"{n.name} ({n.op_type}) output {o} is a float graph output")
                continue
            for c in consumers.get(o, []):
                if c.op_type != "QuantizeLinear":
                    problems.append(f"{n.name} ({n.op_type}) output {o} feeds {c.op_type} unquantized")
    return problems
