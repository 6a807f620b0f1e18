"""Calibration: run the float parts over real text through the host loop and record statistics.

The float AR-N graph of each part runs on ONNX Runtime with its intermediate tensors exposed as
extra outputs, so statistics are keyed by the exact tensor names the QDQ rewrite quantizes.
Calibration goes part by part, and inside a part layer by layer (:func:`part_segments`): each
decoder layer runs as a sub-model of the part graph over every chunk, fed the hidden states the
layer before produced (N x H floats), with its own KV cache filled chunk by chunk as in
generation, so later chunks see a real cache. Only one layer's weights and Hessians are in
memory at a time, which is what lets a 7B model be calibrated on a 24 GB machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qwen_ondevice.core.encodings import DATA_MOVEMENT
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.parts import PartSpec
from qwen_ondevice.core.progress import bar
from qwen_ondevice.runtime.engine import make_call_inputs

#: Calibration sequence length cap (tokens). Tried for the demo at CL 4096, so that the KV-cache
#: encodings cover every position: one 4096-token sequence instead of two of 2048 (clearly worse),
#: and key ranges swept over every cache position (no better past position 2048); docs/numerics.md
#: "Accuracy of the bundle" has both, so the cap stays.
CALIBRATION_SEQ_LEN = 2048


@dataclass
class CalibrationPlan:
    """How calibration tokens are fed: sequences of ``seq_len`` tokens (a multiple of AR), each
    from an empty cache, in AR-sized chunks."""

    ids: np.ndarray  # (S, seq_len) int32
    ar: int
    context_length: int

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(sequence, chunk) pairs in feeding order."""
        S, T = self.ids.shape
        return [(s, c) for s in range(S) for c in range(T // self.ar)]

    @classmethod
    def from_tokens(cls, ids: list[int], ar: int, context_length: int,
                    max_seq_len: int = CALIBRATION_SEQ_LEN) -> "CalibrationPlan":
        """Sequences of min(CL, ``max_seq_len``) tokens (a multiple of AR), each from an empty
        cache; fewer tokens than one sequence: one shorter sequence.

        Raises:
            UserError: fewer tokens than one AR chunk.
        """
        seq = min(context_length, max_seq_len) // ar * ar
        seq = max(seq, ar)
        n = len(ids) // seq
        if n == 0:
            seq = len(ids) // ar * ar
            n = 1
        if seq == 0:
            raise UserError(f"calibration needs at least {ar} tokens (one AR-{ar} chunk), got {len(ids)}")
        return cls(np.asarray(ids[: n * seq], np.int32).reshape(n, seq), ar, context_length)


@dataclass
class TensorStats:
    """Running statistics of one float tensor over every calibration call."""

    lo: float = np.inf
    hi: float = -np.inf
    channel_absmax: np.ndarray | None = None  # (C,) over the last axis, for RMSNorm in/out
    channel_sumsq: np.ndarray | None = None  # (K,) sum of x^2 per input channel of a MatMul
    channel_lo: np.ndarray | None = None  # (C,) per-channel min over the last axis (MLP smoothing)
    channel_hi: np.ndarray | None = None  # (C,) per-channel max
    hessian: np.ndarray | None = None  # (K, K) float32 sum of x x^T (GPTQ)
    rows: int = 0
    sample: list = field(default_factory=list)  # value samples (KV tensors), for MSE clipping


@dataclass
class PartStats:
    """Every tracked tensor's statistics for one part, plus the names of the special tensors."""

    tensors: dict[str, TensorStats]

    def save(self, path: Path) -> None:
        """Write the statistics to ``path`` (.npz); each Hessian goes to a .npy file of its own
        beside it (``<stem>.hessian<k>.npy``), which :meth:`load` memory-maps: a part's Hessians
        are 12.7 GB for 8 layers of Qwen2-7B, and quantization reads them one at a time."""
        arrays = {}
        k = 0
        for name, s in self.tensors.items():
            arrays[f"{name}|range"] = np.array([s.lo, s.hi, s.rows], np.float64)
            for key in ("channel_absmax", "channel_sumsq", "channel_lo", "channel_hi"):
                v = getattr(s, key)
                if v is not None:
                    arrays[f"{name}|{key}"] = v
            if isinstance(s.hessian, np.memmap) and Path(s.hessian.filename).parent == path.parent.resolve():
                arrays[f"{name}|hessian_file"] = np.array(Path(s.hessian.filename).name)  # spilled already
            elif s.hessian is not None:
                hname = f"{path.stem}.hessian.{k}.npy"
                tmp = path.with_name(hname + ".partial.npy")
                np.save(tmp, s.hessian)
                tmp.replace(path.with_name(hname))
                arrays[f"{name}|hessian_file"] = np.array(hname)
                k += 1
            if s.sample:
                arrays[f"{name}|sample"] = np.concatenate(s.sample)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    def unmap(self, name: str) -> None:
        """Map the Hessian file of ``name`` afresh, so that the pages read so far leave this
        process (a memory map keeps every page it has read resident in RSS until it is closed)."""
        h = self.tensors[name].hessian
        if isinstance(h, np.memmap):
            self.tensors[name].hessian = np.load(h.filename, mmap_mode="r")

    @classmethod
    def load(cls, path: Path) -> "PartStats":
        """Read :meth:`save`'s files; the Hessians are memory-mapped (read-only), not loaded."""
        data = np.load(path)
        tensors: dict[str, TensorStats] = {}
        for key in data.files:
            name, kind = key.rsplit("|", 1)
            s = tensors.setdefault(name, TensorStats())
            if kind == "range":
                s.lo, s.hi, s.rows = float(data[key][0]), float(data[key][1]), int(data[key][2])
            elif kind == "sample":
                s.sample = [data[key]]
            elif kind == "hessian_file":
                s.hessian = np.load(path.with_name(str(data[key])), mmap_mode="r")
            else:
                setattr(s, kind, data[key])
        return cls(tensors)


def is_row_max_shift(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``node`` is the ``scores - ReduceMax(scores)`` Sub before a Softmax
    (:func:`qwen_ondevice.export.onnx_graph.shift_by_row_max`); its encoding is fixed, not calibrated."""
    p = producers.get(node.input[1]) if node.op_type == "Sub" else None
    return p is not None and p.op_type == "ReduceMax"


def tracked_tensors(model: onnx.ModelProto, hidden_in: str | None) -> dict[str, set[str]]:
    """Which float tensors of a float part graph need statistics, and which kinds
    (``hidden_in``: the part's boundary input, :attr:`qwen_ondevice.core.parts.PartSpec.hidden_in`).

    Returns name -> kinds, kinds from {"range", "matmul_input", "norm_io", "channel_range",
    "sample"} ("channel_range": per-channel min/max of the down_proj input and the up_proj
    output, which :mod:`qwen_ondevice.quantize.smoothing` rescales). Skipped:
    outputs of data-movement ops and Softmax (fixed [0, 1]), the KV concatenations (they take
    the cache's encoding) and the mask addition (its range is derived from the scores).
    """
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    kinds: dict[str, set[str]] = {}

    def add(name, kind):
        kinds.setdefault(name, set()).add(kind)

    if hidden_in is not None and hidden_in in graph_inputs:
        add(hidden_in, "range")
    for node in model.graph.node:
        out = node.output[0]
        if node.op_type in DATA_MOVEMENT or node.op_type == "Softmax":
            continue
        if node.op_type == "Concat" and any(i.startswith("past_") for i in node.input):
            continue
        if node.op_type == "Add" and "attention_mask" in node.input:
            continue
        if node.op_type == "ReduceMax" or is_row_max_shift(node, producers):
            continue
        if node.op_type == "MatMul" and node.input[1] in inits:
            add(node.input[0], "matmul_input")
            if ".mlp.down_proj." in node.input[1]:
                add(node.input[0], "channel_range")
            if ".mlp.up_proj." in node.input[1]:
                add(out, "channel_range")
        if node.op_type == "SimplifiedLayerNormalization":
            add(node.input[0], "norm_io")
            add(out, "norm_io")
        add(out, "range")
    for o in model.graph.output:
        if o.name.startswith("past_"):
            add(o.name, "sample")
    for k in kinds:
        kinds[k].add("range")
    return kinds


class Calibrator:
    """Accumulates :class:`TensorStats` from the arrays a calibration call returns."""

    def __init__(self, kinds: dict[str, set[str]], hessians: bool, rng_seed: int = 0, sample_per_call: int = 4096):
        self.kinds = kinds
        self.hessians = hessians
        self.stats = {name: TensorStats() for name in kinds}
        self.rng = np.random.default_rng(rng_seed)
        self.sample_per_call = sample_per_call

    def update(self, name: str, x: np.ndarray) -> None:
        s = self.stats[name]
        kinds = self.kinds[name]
        x = np.asarray(x, np.float32)
        s.lo, s.hi = min(s.lo, float(x.min())), max(s.hi, float(x.max()))
        if "norm_io" in kinds:
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            s.channel_absmax = m if s.channel_absmax is None else np.maximum(s.channel_absmax, m)
        if "channel_range" in kinds:
            _channel_range(s, x.reshape(-1, x.shape[-1]))
        if "key_channel_range" in kinds:  # past_key_*_out (KVH, 1, D, AR) -> per (KVH * D) channel
            _channel_range(s, x.transpose(3, 0, 1, 2).reshape(x.shape[3], -1))
        if "matmul_input" in kinds:
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sq = (rows**2).sum(axis=0)
            s.channel_sumsq = sq if s.channel_sumsq is None else s.channel_sumsq + sq
            s.rows += rows.shape[0]
            if self.hessians:
                if s.hessian is None:
                    s.hessian = np.zeros((x.shape[-1], x.shape[-1]), np.float32)
                _add_gram(s.hessian, x.reshape(-1, x.shape[-1]))
        if "sample" in kinds:
            flat = x.ravel()
            s.sample.append(flat[self.rng.integers(0, flat.size, self.sample_per_call)])

    def spill(self, names, stem: Path) -> None:
        """Write the Hessians of ``names`` to ``<stem>.hessian<k>.npy`` files and keep them as
        read-only memory maps (:meth:`PartStats.save` then refers to the files as they are)."""
        for name in names:
            s = self.stats[name]
            if s.hessian is None or isinstance(s.hessian, np.memmap):
                continue
            k = sum(isinstance(t.hessian, np.memmap) for t in self.stats.values())
            path = _spilled_name(stem, k)
            tmp = path.with_name(path.name + ".partial.npy")
            np.save(tmp, s.hessian)
            tmp.replace(path)
            s.hessian = np.load(path, mmap_mode="r")


def _spilled_name(stem: Path, k: int) -> Path:
    return stem.with_name(f"{stem.name}.hessian{k}.npy")


def _add_gram(h: np.ndarray, rows: np.ndarray) -> None:
    """h (K, K) float32 += rows^T rows for rows (N, K) float32, in place: one BLAS call with
    beta = 1 (torch's ``addmm_``), no K x K temporary, where numpy's ``h += rows.T @ rows``
    builds the product first and adds it in a second pass over h."""
    import torch

    r = torch.from_numpy(np.ascontiguousarray(rows, np.float32))
    torch.from_numpy(h).addmm_(r.T, r)


def _channel_range(s: TensorStats, rows: np.ndarray) -> None:
    """Fold the per-column min/max of ``rows`` (N, C) into ``s.channel_lo``/``s.channel_hi`` (C,)."""
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    s.channel_lo = lo if s.channel_lo is None else np.minimum(s.channel_lo, lo)
    s.channel_hi = hi if s.channel_hi is None else np.maximum(s.channel_hi, hi)


@dataclass
class Segment:
    """A run of a part's float graph that calibration executes on its own: one decoder layer
    (its residual input -> its residual output and its KV outputs), the final norm and lm_head,
    or the whole graph (the embedding part). ``layers`` are the decoder layers whose KV cache
    it reads and writes."""

    inputs: list[str]
    outputs: list[str]
    layers: list[int]


def part_segments(model: onnx.ModelProto, part: PartSpec) -> list[Segment]:
    """Split a part's float graph (``onnx_graph.build_part_graph``) at the residual stream
    between its decoder layers: each layer starts at its ``input_layernorm``, whose input is the
    residual tensor entering the layer (the part's boundary input for the first); the head
    (final norm, lm_head) is a segment of its own. The tensor names are the part graph's, so the
    statistics are keyed as the QDQ rewrite expects.

    Raises:
        ValueError: a layer's input norm is not found (not a graph ``build_part_graph`` made).
    """
    if part.embedding or not len(part.layers):
        return [Segment([i.name for i in model.graph.input], [o.name for o in model.graph.output], [])]
    norm_input = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"}
    starts = []
    for layer in part.layers:
        key = f"model.layers.{layer}.input_layernorm.weight"
        if key not in norm_input:
            raise ValueError(f"{part.name}: no input_layernorm found for layer {layer}")
        starts.append(norm_input[key])
    host = ["attention_mask", "position_ids_cos", "position_ids_sin"]
    if part.head:
        ends = starts[1:] + [norm_input["model.norm.weight"]]
    else:
        ends = starts[1:] + [part.hidden_out]
    segments = [Segment([a, *host, f"past_key_{l}_in", f"past_value_{l}_in"], [b, f"past_key_{l}_out", f"past_value_{l}_out"], [l])
                for l, a, b in zip(part.layers, starts, ends)]
    if part.head:
        segments.append(Segment([ends[-1]], ["logits"], []))
    return segments


def segment_model(model: onnx.ModelProto, seg: Segment, extra_outputs: list[str]) -> onnx.ModelProto:
    """The sub-model computing ``seg.outputs`` (and ``extra_outputs`` produced on the way) from
    ``seg.inputs``: the nodes they need, in graph order, and only the initializers those read
    (still pointing at the part's external-data file, so it is loaded from the same folder)."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    need, stack = set(), list(seg.outputs)
    stop = set(seg.inputs)
    while stack:
        t = stack.pop()
        if t in stop or t not in producer or producer[t] in need:
            continue
        need.add(producer[t])
        stack.extend(g.node[producer[t]].input)
    nodes = [g.node[i] for i in sorted(need)]
    made = {o for n in nodes for o in n.output}
    used = {i for n in nodes for i in n.input}
    graph_inputs = {i.name: i for i in g.input}
    inputs = [graph_inputs.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
              for name in seg.inputs]
    graph_outputs = {o.name: o for o in g.output}
    outputs = [graph_outputs.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
               for name in seg.outputs]
    outputs += [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                for n in extra_outputs if n in made and n not in seg.outputs]
    sub = onnx.helper.make_graph(nodes, g.name, inputs, outputs, [t for t in g.initializer if t.name in used])
    return onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)


def _segment_session(float_graph: Path, model: onnx.ModelProto, seg: Segment, kinds: dict[str, set[str]]):
    """An ONNX Runtime CPU session of one segment with every tensor in ``kinds`` it makes as an
    output (graph optimizations off, so each tensor exists as the graph names it)."""
    import onnxruntime as ort

    aug = float_graph.with_name(float_graph.stem + ".calib.onnx")
    onnx.save(segment_model(model, seg, list(kinds)), str(aug))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    sess = ort.InferenceSession(str(aug), sess_options=so, providers=["CPUExecutionProvider"])
    aug.unlink()
    return sess


def _run_segment(sess, seg: Segment, plan: CalibrationPlan, kv_shape: tuple[int, int], x_in: np.ndarray | None,
                 tables: tuple[np.ndarray, np.ndarray, float], cal: Calibrator, mine: list[str], progress) -> np.ndarray:
    """Feed every calibration chunk through one segment's session, sequence by sequence with the
    segment's layers' own float KV caches, updating ``cal`` with the tensors ``mine``; returns the
    segment's output per chunk (n_chunks, AR, H) float32 ((n_chunks, AR, 0) for the head).

    ``tables`` is (cos table, sin table, mask value) of :func:`make_call_inputs`."""
    AR, CL = plan.ar, plan.context_length
    P = CL - AR
    KVH, D = kv_shape
    cos_table, sin_table, mask_value = tables
    out_names = [o.name for o in sess.get_outputs()]
    keys = {l: np.zeros((KVH, 1, D, P), np.float32) for l in seg.layers}
    values = {l: np.zeros((KVH, 1, P, D), np.float32) for l in seg.layers}
    outputs = []
    for i, (s, c) in enumerate(plan.chunks):
        tokens = plan.ids[s, c * AR : (c + 1) * AR]
        n_past = c * AR
        if x_in is None:
            feeds = {"input_ids": tokens[None].astype(np.int32)}
        else:
            feeds = {seg.inputs[0]: x_in[i][None]}
            if seg.layers:
                x = make_call_inputs(list(tokens), AR, n_past, CL, cos_table, sin_table, mask_value)
                feeds.update({"attention_mask": x.attention_mask, "position_ids_cos": x.cos, "position_ids_sin": x.sin})
            for l in seg.layers:
                if c == 0:  # a new sequence
                    keys[l][:] = 0
                    values[l][:] = 0
                feeds[f"past_key_{l}_in"] = keys[l]
                feeds[f"past_value_{l}_in"] = values[l]
        res = dict(zip(out_names, sess.run(out_names, feeds)))
        for name in mine:
            cal.update(name, feeds[name] if name in feeds else res[name])
        for l in seg.layers:
            if n_past + AR <= P:
                keys[l][..., n_past : n_past + AR] = res[f"past_key_{l}_out"]
                values[l][:, :, n_past : n_past + AR, :] = res[f"past_value_{l}_out"]
        outputs.append(res[seg.outputs[0]][0] if seg.outputs[0] != "logits" else np.zeros((AR, 0), np.float32))
        progress.update()
    return np.stack(outputs)


def calibrate_part(
    float_graph: Path,
    kinds: dict[str, set[str]],
    plan: CalibrationPlan,
    part: PartSpec,
    kv_shape: tuple[int, int],
    hidden_in: np.ndarray | None,
    cos_table: np.ndarray,
    sin_table: np.ndarray,
    mask_value: float,
    hessians: bool = False,
    label: str = "",
    spill: Path | None = None,
) -> tuple[PartStats, np.ndarray]:
    """Run one part's float AR graph over every calibration chunk, one :class:`Segment` (decoder
    layer) at a time; returns its statistics and its outputs per chunk (hidden states
    (n_chunks, AR, H); for the last part, nothing useful).

    ``hidden_in`` is (n_chunks, AR, H) float32 from the previous part, fed as the part's boundary
    input ``part.hidden_in`` (None for the embedding part, which reads the token ids). ``kv_shape``
    is (KVH, D). Each layer keeps its own float KV cache per sequence, exactly as the engine does.
    Memory holds one layer's float weights (ONNX Runtime loads only the segment's initializers),
    the hidden states of every chunk twice, and, with ``spill`` (a file stem), only one layer's
    Hessians: they are written to ``<spill>.hessian<k>.npy`` when the layer is done and kept as
    read-only memory maps. Nothing held grows with the number of layers.
    """
    model = onnx.load(str(float_graph), load_external_data=False)
    cal = Calibrator(kinds, hessians)
    x_in = hidden_in
    segments = part_segments(model, part)
    progress = bar(total=len(plan.chunks) * len(segments), desc=f"[calibrate] {label}", unit="chunk")
    for seg in segments:
        if seg.outputs == ["logits"] and "logits" not in kinds and len(segment_model(model, seg, list(kinds)).graph.output) == 1:
            progress.update(len(plan.chunks))  # the head, with nothing to measure (key equalization)
            continue
        sess = _segment_session(float_graph, model, seg, kinds)
        out_names = {o.name for o in sess.get_outputs()}
        # the part's boundary input is counted in the first segment; every other tensor where it is made
        mine = [n for n in kinds if n in out_names or (n == part.hidden_in and seg is segments[0])]
        x_in = _run_segment(sess, seg, plan, kv_shape, x_in, (cos_table, sin_table, mask_value), cal, mine, progress)
        del sess
        if spill is not None:
            cal.spill(mine, spill)
    progress.close()
    return PartStats(cal.stats), (np.zeros((len(plan.chunks), plan.ar, 0), np.float32) if part.head else x_in)
