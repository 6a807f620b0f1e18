"""Host-only rewrites of a part's QDQ graph for the ``ort-cpu`` backend.

The bundle's graphs are written for the HTP: static shapes (the past is always CL - AR slots) and
QDQ node units the QNN EP maps one to one. On the host CPU these rewrites do the same arithmetic
with less work; none is ever written into the bundle, the device graphs stay as exported:

1. :func:`gather_before_dequantize`: the embedding's ``DequantizeLinear(whole int8 table) ->
   Gather`` becomes ``Gather -> DequantizeLinear`` (per-tensor encodings only, so the element
   values are bitwise the same). ONNX Runtime otherwise dequantizes all V x H entries on every
   call.
2. :func:`symbolic_past`: the past length of ``past_key_*_in`` / ``past_value_*_in`` and the
   key length of ``attention_mask`` become symbolic, so the backend can feed only the filled
   slots of the left-aligned cache (:class:`~qwen_ondevice.runtime.engine.KVCache`). The graphs are
   shape-generic along that axis (Concat, MatMul, Softmax over the last axis). The slots left out
   are masked ones: their scores are clipped to 20 below the row max (qdq.MASK_MARGIN), so each
   weighed < exp(-20) in the softmax sum; dropping them moves that sum by < 1e-5 of itself, which
   turns a few uint16 probabilities (step 1.5e-5) by one step. The static run has no claim to be
   closer to the HTP here.
3. :func:`float_matmul_weights`: int8 MatMul weights dequantized once into float initializers.
4. :func:`fold_constant_dequantize`: the other DequantizeLinear nodes of initializers (biases,
   norm weights, key centers) computed once, with DequantizeLinear's own formula.
5. :func:`drop_data_movement_qdq`: ``DQ -> Transpose/Reshape/Split -> Q`` with one encoding on
   both sides moves the integers directly.

4 and 5 are bitwise the same. What each rewrite saves and changes, measured: docs/benchmarks.md
"Host rewrites and host numerics".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from qwen_ondevice.core.encodings import DATA_MOVEMENT
from qwen_ondevice.core.onnx_data import read_initializer

#: Host memory (bytes) a bundle's AR-1 sessions may spend, all parts together, on int8 weights
#: dequantized once (float_matmul_weights; the ort-cpu backend shares it across its sessions), at
#: most: see :func:`host_float_budget`.
HOST_FLOAT_BUDGET = 4 << 30

#: The share of the machine's memory the float copies may take. ONNX Runtime prepacks each float
#: MatMul weight into a layout of its own, so a copy costs about twice its size while the sessions
#: live; 1/16 keeps a Qwen2-7B bundle's runtime (five parts, AR-128 and AR-1 sessions) within 20 GB
#: on a 24 GB machine.
HOST_FLOAT_SHARE = 1 / 16


def host_float_budget(machine_bytes: int | None = None) -> int:
    """The float-copy budget for this machine (bytes): :data:`HOST_FLOAT_SHARE` of its memory
    (``machine_bytes``, default the total RAM psutil reports), at most :data:`HOST_FLOAT_BUDGET`."""
    if machine_bytes is None:
        machine_bytes = psutil.virtual_memory().total
    return int(min(HOST_FLOAT_BUDGET, machine_bytes * HOST_FLOAT_SHARE))

#: Symbolic dimension names given by :func:`symbolic_past`.
PAST_DIM, KEYS_DIM = "past_length", "key_length"


def _users(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def gather_before_dequantize(model) -> int:
    """Swap ``DequantizeLinear(initializer, scalar scale) -> Gather`` into ``Gather -> DequantizeLinear``.

    DequantizeLinear with a per-tensor scale and zero point is elementwise, so gathering the
    quantized rows first gives bitwise the same float rows (ONNX DequantizeLinear:
    ``(x - zero_point) * scale``). Only DQs whose sole consumer is the Gather's data input are
    swapped. Returns the number of swaps; ``model`` (an ``onnx.ModelProto``) is edited in place.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = _users(g)
    swapped = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        x = inits.get(dq.input[0])
        consumers = users.get(dq.output[0], [])
        if x is None or len(consumers) != 1 or consumers[0].op_type != "Gather" or consumers[0].input[0] != dq.output[0]:
            continue
        if any(i and (i not in inits or len(inits[i].dims) != 0) for i in dq.input[1:]):
            continue  # per-axis or block-wise: the scale would have to be gathered too
        gather = consumers[0]
        rows_q = gather.output[0] + ".host_q"
        new_gather = helper.make_node("Gather", [dq.input[0], gather.input[1]], [rows_q], name=gather.name + ".host",
                                      **{a.name: helper.get_attribute_value(a) for a in gather.attribute})
        new_dq = helper.make_node("DequantizeLinear", [rows_q, *dq.input[1:]], [gather.output[0]], name=dq.name + ".host",
                                  **{a.name: helper.get_attribute_value(a) for a in dq.attribute})
        at = list(g.node).index(gather)
        g.node.remove(gather)
        g.node.insert(at, new_dq)
        g.node.insert(at, new_gather)
        g.node.remove(dq)
        swapped += 1
    return swapped


def symbolic_past(model) -> int:
    """Make the past axis of ``past_key_{l}_in`` (KVH, 1, D, P) / ``past_value_{l}_in`` (KVH, 1, P, D)
    and the key axis of ``attention_mask`` (1, 1, AR, CL) symbolic (:data:`PAST_DIM`,
    :data:`KEYS_DIM`). Returns the number of inputs changed; ``model`` is edited in place.

    Raises:
        ValueError: the graph carries ``value_info`` shapes, which would pin the old lengths.
    """
    g = model.graph
    if len(g.value_info):
        raise ValueError("symbolic_past: the graph has value_info shapes; the bundle's graphs never do")
    changed = 0
    for inp in g.input:
        dims = inp.type.tensor_type.shape.dim
        axis, name = ((3, PAST_DIM) if inp.name.startswith("past_key_") else (2, PAST_DIM) if inp.name.startswith("past_value_")
                      else (3, KEYS_DIM) if inp.name == "attention_mask" else (None, None))
        if axis is not None:
            dims[axis].dim_param = name  # clears dim_value (a oneof)
            changed += 1
    return changed


def float_matmul_weights(model, base: Path, budget: int = HOST_FLOAT_BUDGET) -> dict[str, np.ndarray]:
    """Dequantize the graph's int8 MatMul weights once, into float initializers.

    ONNX Runtime fuses ``DequantizeLinear(int8 weight (K, N), per-channel scale) -> MatMul`` into
    a MatMulNBits whose 8-bit kernel at the fp32 accuracy level the QDQ simulation needs
    (``QDQ_MATMULNBITS_ACCURACY`` in ort_backend) dequantizes the whole weight again on every call
    (per-channel or block-wise alike): the int8 lm_head alone is 0.8 s of a 1.1 s AR-1 call on the
    demo model (ORT profiler). Here each int8 weight is dequantized once, ``W = (q - zero) * scale``
    in float32 (DequantizeLinear's own formula), and the MatMul reads that float initializer: the
    same arithmetic as the QDQ graph, at 4 bytes per weight of host memory. Weights are taken
    largest first (the lm_head, then int8 projections) while they fit in ``budget`` bytes; the rest
    keep the fused kernel. int4 weights keep MatMulNBits, whose 4-bit kernel is fast.

    ``model`` is edited in place (its external data is read from ``base``); returns
    {initializer name: float32 (K, N) array} to pass to ``SessionOptions.add_external_initializers``.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = _users(g)
    candidates = []
    for n in g.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 2:
            continue
        if any(a.name == "block_size" for a in n.attribute) or not all(u.op_type == "MatMul" for u in users.get(n.output[0], [None])):
            continue
        candidates.append((w.dims[0] * w.dims[1] * 4, n, w))
    arrays: dict[str, np.ndarray] = {}
    used = 0
    for nbytes, dq, w in sorted(candidates, key=lambda c: -c[0]):
        if used + nbytes > budget:
            continue
        used += nbytes
        q = read_initializer(w, base)  # (K, N) int8
        scale = read_initializer(inits[dq.input[1]], base).astype(np.float32)  # (N,)
        zero = read_initializer(inits[dq.input[2]], base).astype(np.int32) if len(dq.input) > 2 and dq.input[2] else 0
        name = w.name + ".host_float"
        arrays[name] = ((q.astype(np.int32) - zero).astype(np.float32) * scale[None, :]).astype(np.float32)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(w.dims), data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "host_float_weights.bin"), ("offset", "0"), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        g.initializer.append(t)
        for u in users[dq.output[0]]:
            u.input[list(u.input).index(dq.output[0])] = name
        g.node.remove(dq)
        for i in dq.input:  # the int8 weight, scale and zero point, unless another node reads them
            if i and all(u is dq for u in users.get(i, [])) and i in inits:
                g.initializer.remove(inits.pop(i))
    return arrays




def _values(inits: dict, base: Path, names) -> list | None:
    """The values of initializers ``names`` (None when one of them is not an initializer)."""
    if not all(n in inits for n in names):
        return None
    return [read_initializer(inits[n], base) for n in names]


def fold_constant_dequantize(model, base: Path) -> int:
    """Replace each ``DequantizeLinear`` of initializers that no MatMul reads by its float32 value.

    The value is DequantizeLinear's formula ``(x - zero_point) * scale`` (ONNX spec), computed
    once in numpy: an int32 difference converted to float32 and one float32 product, so bitwise
    what ONNX Runtime computes on every call. Per-tensor and per-axis (1-D scale) encodings only;
    DQs read by a MatMul are left to ONNX Runtime's weight fusions and :func:`float_matmul_weights`.
    Returns the number folded; ``model`` is edited in place.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = _users(g)
    outputs = {o.name for o in g.output}
    folded = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        if any(u.op_type == "MatMul" for u in users.get(dq.output[0], [])) or dq.output[0] in outputs:
            continue
        vals = _values(inits, base, [i for i in dq.input if i])
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        if vals is None or "block_size" in attrs:
            continue
        x, scale = vals[0], vals[1].astype(np.float32)
        zero = vals[2].astype(np.int32) if len(vals) > 2 else np.zeros_like(scale, dtype=np.int32)
        if scale.ndim == 1 and x.ndim:  # per-axis: broadcast along ``axis``
            shape = [1] * x.ndim
            shape[attrs.get("axis", 1) % x.ndim] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        elif scale.ndim:
            continue
        value = (x.astype(np.int32) - zero).astype(np.float32) * scale
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), dq.output[0]))
        g.node.remove(dq)
        folded += 1
    return folded


def drop_data_movement_qdq(model, base: Path) -> int:
    """Run data-movement ops (:data:`DATA_MOVEMENT`) on the quantized integers.

    Rewrites ``DQ(q; s, z) -> op -> Q(.; s, z)`` (every output of ``op`` read by exactly one
    QuantizeLinear, all with the DQ's per-tensor scale and zero point) to ``op(q)``. Q(DQ(q)) = q:
    the float round trip (q - z) * s / s is off by less than 1e-6 * |q - z| (float32), far below
    the half step at which rounding would change it. The DQ stays when another node still reads
    its float output. Returns the number of ops rewritten; ``model`` is edited in place.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = _users(g)
    producers = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rewritten = 0
    for node in [n for n in g.node if n.op_type in DATA_MOVEMENT]:
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.output[0] in outputs or len(dq.input) < 3:
            continue
        qs = [users.get(o, []) for o in node.output]
        if any(len(u) != 1 or u[0].op_type != "QuantizeLinear" or len(u[0].input) < 3 or o in outputs
               for u, o in zip(qs, node.output)):
            continue
        enc = _values(inits, base, dq.input[1:3])  # the zero point fixes the integer type: needed on both sides
        if enc is None or any(a.name in ("axis", "block_size") for a in dq.attribute):
            continue
        if not all((qenc := _values(inits, base, q.input[1:3])) is not None
                   and not any(a.name in ("axis", "block_size") for a in q.attribute)
                   and all(a.dtype == b.dtype and a.shape == b.shape == () and np.array_equal(a, b) for a, b in zip(enc, qenc))
                   for (q,) in qs):
            continue
        node.input[0] = dq.input[0]
        for i, (q,) in enumerate(qs):
            node.output[i] = q.output[0]
            g.node.remove(q)
        users[dq.output[0]] = [u for u in users[dq.output[0]] if u is not node]
        if not users[dq.output[0]]:
            g.node.remove(dq)
        rewritten += 1
    return rewritten


def float_activations(model, pattern: str) -> int:
    """A diagnostic, never a device numerics: run the activations whose tensor name matches the
    regular expression ``pattern`` (``re.search``) in float, by removing their
    ``QuantizeLinear -> DequantizeLinear`` pair; each DequantizeLinear reader then reads the
    float tensor. Graph inputs and outputs (the host quantizes those; the KV cache, the part
    boundaries, the logits) and weights keep their encodings. What one quantization point costs
    is the accuracy with it removed (``evaluate --float-activations``). Tensor names are the
    exporter's ``<op>_<n>`` (``softmax_``, ``sub_`` ...). Returns the number of pairs removed.

    Raises:
        ValueError: ``pattern`` is not a valid regular expression.
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--float-activations {pattern!r}: {e}") from None
    g = model.graph
    users = _users(g)
    io = {t.name for t in g.input} | {t.name for t in g.output}
    inits = {t.name for t in g.initializer}
    removed = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        x, y = q.input[0], q.output[0]
        readers = users.get(y, [])
        if x in inits or x in io or y in io or not rx.search(x) or not readers \
                or any(r.op_type != "DequantizeLinear" or r.input[0] != y or r.output[0] in io for r in readers):
            continue
        for dq in readers:
            for n in users.get(dq.output[0], []):
                for i, name in enumerate(n.input):
                    if name == dq.output[0]:
                        n.input[i] = x
            g.node.remove(dq)
        g.node.remove(q)
        users = _users(g)
        removed += 1
    return removed


def host_model(model_path: Path, float_weights: bool, dynamic_past: bool = True,
               budget: int = HOST_FLOAT_BUDGET, float_pattern: str | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """The graph at ``model_path`` with the host rewrites of this module applied.

    ``float_weights``: also :func:`float_matmul_weights` (worth it at AR-1 only: at AR-128 the fused
    kernel's dequantization is spread over 128 rows and is faster than the float MatMul,
    benchmarks/bench_host_speed.py). ``dynamic_past``: :func:`symbolic_past`. ``float_pattern``:
    :func:`float_activations` (a diagnostic).

    Returns (serialized model, {initializer name: float32 array}); the model's external data
    stays in its file, so open it with ``session.model_external_initializers_file_folder_path``
    set to ``model_path.parent``.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    base = model_path.parent
    if float_pattern:
        float_activations(model, float_pattern)
    gather_before_dequantize(model)
    fold_constant_dequantize(model, base)
    drop_data_movement_qdq(model, base)
    if dynamic_past:
        symbolic_past(model)
    arrays = float_matmul_weights(model, base, budget) if float_weights else {}
    drop_unused_initializers(model)
    return model.SerializeToString(), arrays


def drop_unused_initializers(model) -> None:
    """Remove the initializers no node reads any more (inputs of rewritten nodes), in place."""
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
