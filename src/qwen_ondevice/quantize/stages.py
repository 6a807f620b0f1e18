"""The quantized export stages of one part: float graphs -> calibration -> QDQ graphs.

Per part, in order (each a resumable stage of :mod:`qwen_ondevice.export.pipeline`):
1. ``float``: the part's fp32 graphs into ``BUNDLE/.export/float/`` (temporary), then key
   equalization (:func:`equalize_stage`) rewrites their q/k weights in place; one stamp for both;
2. ``calib``: the float AR-128 graph over the calibration chunks, layer by layer
   (:mod:`calibrate`), with the previous part's hidden states as input; statistics, Hessians
   and this part's outputs saved;
3. ``part``: weights quantized (int4/int8, MSE clipping or GPTQ), activation encodings chosen,
   both AR graphs rewritten to QDQ (:mod:`qdq`) into ``onnx/`` and checked; then the part's
   intermediates are deleted (:func:`remove_part_intermediates`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qwen_ondevice.core.encodings import Encoding
from qwen_ondevice.core.export_layout import CALIB, FLOAT, work_dir
from qwen_ondevice.core.layer import PROJECTIONS
from qwen_ondevice.core.onnx_data import read_initializer
from qwen_ondevice.core.onnx_io import ExternalData
from qwen_ondevice.core.parts import PartSpec
from qwen_ondevice.core.progress import bar, log
from qwen_ondevice.core.rope import rope_tables
from qwen_ondevice.quantize.calibrate import CalibrationPlan, PartStats, calibrate_part, tracked_tensors
from qwen_ondevice.quantize.kv_equalize import equalize_part, qk_output_names
from qwen_ondevice.quantize.qdq import activation_encodings, check_quantized_graph, quantize_graph, residual_stream
from qwen_ondevice.quantize.smoothing import smooth_mlp
from qwen_ondevice.quantize.weight_quant import QuantizedWeight, hessian_factor, quantize_weight


@dataclass
class QuantSettings:
    """The quantization choices of an export (part of its options, so a resume must match).

    precision: ``w4a16`` (int4 projections) or ``w8a16`` (int8 projections); lm_head int8 and
    activations uint16 in both. weight_method: ``mse`` or ``gptq``. int8_fraction (w4a16): the
    share of a part's projection weights kept at int8, given to the projections with the largest
    measured relative output error at int4 (the mixed precision of docs/numerics.md; 0 keeps
    every projection at int4). int8_projections (w4a16): projection kinds (``"q_proj"``, ...)
    kept at int8 in every layer, whatever their measured error; the int8 share then picks among
    the rest. smooth_alpha: when > 0, the down_proj input's range is migrated into the weights
    (:mod:`qwen_ondevice.quantize.smoothing`) before quantization. down_proj_headroom: see
    :func:`qwen_ondevice.quantize.qdq.activation_encodings`.
    """

    precision: str
    weight_method: str = "gptq"
    int8_fraction: float = 0.0
    block_size: int | None = None  # int4 scales per block of this many input rows (None: per channel)
    smooth_alpha: float = 0.0  # SmoothQuant migration strength for the down_proj input (0: off)
    down_proj_headroom: float = 1.0  # the down_proj input's uint16 range, widened this many times
    key_minmax: bool = False  # uint8 key cache over the observed min/max (centered keys), not MSE-clipped
    float_residual: bool = True  # the residual stream stays float (fp16 on the HTP), see qdq.residual_stream
    kv_dtype: str = "uint8"  # the KV cache's dtype (core.encodings.KV_CACHE_DTYPES)
    int8_projections: tuple[str, ...] = ()  # w4a16: projection kinds kept at int8 in every layer
    lm_head_bits: int = 8  # 8: int8 per output channel (MSE clipping); 4: int4 like the projections (blocks, weight_method)

    @property
    def projection_bits(self) -> int:
        return 4 if self.precision == "w4a16" else 8


def is_projection(name: str) -> bool:
    return projection_kind(name) is not None


def projection_kind(name: str) -> str | None:
    """``"q_proj"`` for ``model.layers.3.self_attn.q_proj.weight``; None for a weight that is no
    projection (the lm_head)."""
    if not name.startswith("model.layers."):
        return None
    return next((p for p in PROJECTIONS if f".{p}." in name), None)


def _smooth_mlps(part: PartSpec, inits: dict, float_dir: Path, stats: PartStats, matmul_inputs: dict,
                 matmul_outputs: dict, alpha: float) -> tuple[dict[str, np.ndarray], dict]:
    """SmoothQuant-style scaling of each layer's up_proj/down_proj pair (:func:`smooth_mlp`):
    the smoothed float weights by name, and the report of the down_proj input ranges."""
    smoothed, report = {}, {}
    for layer in part.layers:
        up, down = f"model.layers.{layer}.mlp.up_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"
        act, up_out = stats.tensors[matmul_inputs[down]], stats.tensors[matmul_outputs[up]]
        before = (act.lo, act.hi)
        smoothed[up], smoothed[down], s = smooth_mlp(read_initializer(inits[up], float_dir).astype(np.float32),
                                                     read_initializer(inits[down], float_dir).astype(np.float32),
                                                     act, up_out, alpha)
        report[f"model.layers.{layer}.mlp"] = {
            "alpha": alpha, "down_proj_input_range_before": [before[0], before[1]],
            "down_proj_input_range_after": [act.lo, act.hi], "scale_min": float(s.min()), "scale_max": float(s.max())}
    return smoothed, report


class _WeightQuantizer:
    """Quantizes the MatMul weights of one part's float graph, reading each weight (or its
    smoothed version) and its input's calibration statistics.

    It keeps the Hessian factor of the last layer input used, shared by q/k/v and by gate/up
    (which come one after the other in graph order): one K x K factor alive at a time, not one per
    input of the part (8 layers of Qwen2-7B: 12.7 GB); :meth:`release` drops it.
    """

    def __init__(self, inits: dict, float_dir: Path, stats: PartStats, matmul_inputs: dict,
                 smoothed: dict[str, np.ndarray], block_size: int | None):
        self.inits, self.float_dir, self.stats = inits, float_dir, stats
        self.matmul_inputs, self.smoothed, self.block_size = matmul_inputs, smoothed, block_size
        self.factors: dict[str, object] = {}

    def __call__(self, wname: str, bits: int, method: str) -> QuantizedWeight:
        w = (self.smoothed[wname] if wname in self.smoothed
             else read_initializer(self.inits[wname], self.float_dir).astype(np.float32, copy=False))
        act = self.matmul_inputs[wname]
        s = self.stats.tensors[act]
        act_sq = s.channel_sumsq / max(s.rows, 1)
        if method == "gptq" and act not in self.factors:
            self.factors.clear()
            self.factors[act] = hessian_factor(s.hessian)
            self.stats.unmap(act)  # the Hessian's pages, read once, stop counting in RSS
        elif method != "gptq":
            self.factors.clear()  # lm_head (plain rounding): no factor alive while it is quantized
        # a weight whose input size is not a multiple of the block keeps one scale per channel
        block = self.block_size if bits == 4 and w.shape[0] % (self.block_size or 1) == 0 else None
        return quantize_weight(w, bits, act_sq, self.factors.get(act) if method == "gptq" else None, method, block_size=block)

    def release(self) -> None:
        self.factors.clear()


def _weight_entry(q: QuantizedWeight, bits: int) -> dict:
    return {"bits": bits, "rel_error": q.rel_error, **({"block_size": q.block_size} if q.block_size else {})}


def _quantize_weights(part: PartSpec, names: list[str], quantize: _WeightQuantizer, settings: QuantSettings,
                      sizes: dict[str, int]) -> tuple[dict[str, QuantizedWeight], dict]:
    """Every MatMul weight of the part at its precision (projections at ``projection_bits``, the
    lm_head int8 per channel or, with ``--lm-head int4``, as the projections), then the int8
    share of the projections (:func:`_promote_to_int8`); returns the weights and their report."""
    weights, report = {}, {}
    for wname in bar(names, desc=f"[quantize] {part.name}", unit="weight"):
        if projection_kind(wname) in settings.int8_projections and settings.projection_bits == 4:
            weights[wname] = quantize(wname, 8, settings.weight_method)
            report[wname] = {**_weight_entry(weights[wname], 8), "reason": "--int8-projections"}
        elif is_projection(wname):
            weights[wname] = quantize(wname, settings.projection_bits, settings.weight_method)
            report[wname] = _weight_entry(weights[wname], settings.projection_bits)
        elif settings.lm_head_bits == 4:  # lm_head as the int4 projections (--lm-head int4)
            weights[wname] = quantize(wname, 4, settings.weight_method)
            report[wname] = _weight_entry(weights[wname], 4)
        else:  # lm_head: int8 per output channel
            weights[wname] = quantize(wname, 8, "mse")
            report[wname] = {"bits": 8, "rel_error": weights[wname].rel_error}
    projections = [n for n in names if is_projection(n) and weights[n].bits == 4]
    if settings.projection_bits == 4 and settings.int8_fraction > 0 and projections:
        _promote_to_int8(part, projections, weights, report, quantize, settings, sizes)
    quantize.release()
    return weights, report


def _promote_to_int8(part: PartSpec, projections: list[str], weights: dict, report: dict, quantize: _WeightQuantizer,
                     settings: QuantSettings, sizes: dict[str, int]) -> None:
    """Mixed precision by measured sensitivity: the projections with the largest relative int4
    output errors go to int8, up to ``int8_fraction`` of the part's projection weights."""
    budget = settings.int8_fraction * sum(sizes[n] for n in projections)
    used, chosen = 0, set()
    for n in sorted(projections, key=lambda n: -weights[n].rel_error):
        if used + sizes[n] <= budget:
            used += sizes[n]
            chosen.add(n)
    redo = [n for n in projections if n in chosen]  # graph order: k/v of a layer share one factor
    for n in bar(redo, desc=f"[quantize] {part.name} int8", unit="weight"):
        int4_err = weights[n].rel_error
        weights[n] = quantize(n, 8, settings.weight_method)
        report[n] = {"bits": 8, "rel_error": weights[n].rel_error, "int4_rel_error": int4_err,
                     "reason": f"among the largest measured int4 relative output errors ({int4_err:.4f}); "
                               f"int8 budget {settings.int8_fraction:.0%} of the part's projection weights"}
    log(f"[quantize] {part.name}: {len(redo)} projections kept at int8 "
        f"({used / sum(sizes[n] for n in projections):.1%} of projection weights)")


def _write_quantized_graphs(part: PartSpec, ars: list[str], float_dir: Path, float_info: dict, enc, weights: dict,
                            settings: QuantSettings, out_dir: Path) -> tuple[dict, str, int, set[str]]:
    """Rewrite each float AR graph into its QDQ graph (:func:`quantize_graph`), checked, all of
    them pointing at one new external-data file; every file is written under a ``.partial`` name
    and renamed only when all are complete. Returns (graphs entry by AR, data file name, its
    weight bytes, the tensors kept float).

    Raises:
        RuntimeError: a graph fails :func:`check_quantized_graph`.
    """
    data_name = f"{part.name}.data"
    data = ExternalData(out_dir / (data_name + ".partial"))
    data.location = data_name
    graphs, pending, float_tensors = {}, [], set()
    projections = {n for n in weights if is_projection(n)}

    def io(specs):
        return [{**x.to_dict(), **({"encoding": enc.enc[x.name].to_dict()} if x.name in enc.enc else {})} for x in specs]

    try:
        for ar in ars:
            fmodel = onnx.load(str(float_dir / Path(float_info["graphs"][ar]["file"]).name), load_external_data=False)
            residual = frozenset(residual_stream(fmodel, part.hidden_in) if settings.float_residual else ())
            float_tensors.update(residual)
            qmodel, inputs, outputs = quantize_graph(fmodel, float_dir, enc.enc, weights, data, residual)
            problems = check_quantized_graph(qmodel, projections, residual)
            if problems:
                raise RuntimeError(f"{part.name} AR-{ar}: quantized graph check failed: " + "; ".join(problems[:5]))
            fname = f"{part.name}.ar{ar}.onnx"
            tmp = out_dir / (fname + ".partial")
            tmp.write_bytes(qmodel.SerializeToString())
            pending.append((tmp, out_dir / fname))
            graphs[ar] = {"file": f"onnx/{fname}", "inputs": io(inputs), "outputs": io(outputs)}
    finally:
        data.close()
    for tmp, final in pending:
        os.replace(tmp, final)
    os.replace(out_dir / (data_name + ".partial"), out_dir / data_name)
    return graphs, data_name, data.nbytes, float_tensors


def quantize_part_graphs(
    part: PartSpec,
    float_dir: Path,
    float_info: dict,
    stats: PartStats,
    settings: QuantSettings,
    out_dir: Path,
    mask_value: float,
    hidden_in_encoding: Encoding | None = None,
) -> dict:
    """Quantize one part's weights and rewrite each of its float AR graphs; returns the
    manifest entry (files, I/O signature with encodings, per-weight bits and errors).

    ``hidden_in_encoding`` is the encoding the previous part gave the boundary tensor this part
    reads (``part.hidden_in``): a boundary carries one encoding on both sides, decided by the
    producing part (Genie refuses a tensor shared by two graphs with two encodings).

    Raises:
        RuntimeError: the produced graph fails :func:`check_quantized_graph`.
        ValueError: the part reads a boundary and ``hidden_in_encoding`` is missing.
    """
    ars = sorted(float_info["graphs"], key=int, reverse=True)
    ref_graph = onnx.load(str(float_dir / Path(float_info["graphs"][ars[0]]["file"]).name), load_external_data=False)
    inits = {t.name: t for t in ref_graph.graph.initializer}
    matmuls = [n for n in ref_graph.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    matmul_inputs = {n.input[1]: n.input[0] for n in matmuls}
    matmul_outputs = {n.input[1]: n.output[0] for n in matmuls}
    smoothed, smoothing_report = ({}, {}) if settings.smooth_alpha <= 0 else _smooth_mlps(
        part, inits, float_dir, stats, matmul_inputs, matmul_outputs, settings.smooth_alpha)
    enc = activation_encodings(ref_graph, stats, mask_value, settings.down_proj_headroom, settings.key_minmax,
                               settings.kv_dtype)
    if part.hidden_in is not None:
        if hidden_in_encoding is None:
            raise ValueError(f"{part.name}: the encoding of its boundary input {part.hidden_in} (from the previous part) is needed")
        enc.enc[part.hidden_in] = hidden_in_encoding
        enc.notes[part.hidden_in] = "part boundary: the encoding the producing part gave it"
    quantize = _WeightQuantizer(inits, float_dir, stats, matmul_inputs, smoothed, settings.block_size)
    sizes = {n: inits[n].dims[0] * inits[n].dims[1] for n in matmul_inputs}
    weights, weight_report = _quantize_weights(part, list(matmul_inputs), quantize, settings, sizes)
    graphs, data_name, weight_bytes, float_tensors = _write_quantized_graphs(
        part, ars, float_dir, float_info, enc, weights, settings, out_dir)
    norm_report = {
        name: {"min": s.lo, "max": s.hi, "channel_absmax_top": _top_channels(s.channel_absmax),
               "encoding_covers": bool(enc.enc[name].lo <= s.lo + 1e-6 and enc.enc[name].hi >= s.hi - 1e-6)}
        for name, s in stats.tensors.items() if s.channel_absmax is not None
    }
    return {
        **part.to_dict(),
        "data": f"onnx/{data_name}",
        "weight_bytes": weight_bytes,
        "graphs": graphs,
        "weights": weight_report,
        "kv_encodings": {n: e.to_dict() for n, e in enc.enc.items() if n.startswith("past_") and n.endswith("_out")},
        "clipped": enc.notes,
        "float_tensors": sorted(float_tensors, key=natural_key),  # the float residual stream (FLOAT_RESIDUAL_REASON)
        "rmsnorm_ranges": norm_report,
        **({"smoothing": smoothing_report} if smoothing_report else {}),
    }


#: Why the residual stream is left float (listed per tensor in the manifest).
FLOAT_RESIDUAL_REASON = (
    "residual stream: float32 on the host, fp16 on the HTP; one per-tensor uint16 encoding would have "
    "to span the attention-sink token's massive activations and leave ordinary tokens few levels"
)


def boundary_encoding(producer: dict, name: str) -> Encoding:
    """The encoding of the boundary tensor ``name`` in the producing part's manifest entry
    (the same in each of its AR graphs).

    Raises:
        ValueError: the part does not output ``name``, or its graphs disagree on the encoding.
    """
    found = {json.dumps(o["encoding"], sort_keys=True) for g in producer["graphs"].values() for o in g["outputs"]
             if o["name"] == name and "encoding" in o}
    if len(found) != 1:
        raise ValueError(f"{producer['name']}: expected one encoding for its output {name}, found {len(found)}")
    return Encoding.from_dict(json.loads(found.pop()))


def natural_key(name: str) -> tuple:
    """Sort key that orders ``add_12`` after ``add_9``."""
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name))


def _top_channels(m: np.ndarray | None, k: int = 4) -> list[list[float]]:
    if m is None:
        return []
    idx = np.argsort(-m)[:k]
    return [[int(i), float(m[i])] for i in idx]


def calibrate_stage(part: PartSpec, float_dir: Path, float_info: dict, plan: CalibrationPlan, cfg, calib_dir: Path,
                    hessians: bool, mask_value: float) -> None:
    """Run calibration for ``part`` (reads the previous part's saved hidden states)."""
    ar = str(plan.ar)
    graph = float_dir / Path(float_info["graphs"][ar]["file"]).name
    kinds = tracked_tensors(onnx.load(str(graph), load_external_data=False), part.hidden_in)
    prev = calib_dir / f"part_{part.index - 1}.hidden.npy"
    hidden_in = None if part.embedding else np.load(prev)
    cos, sin = rope_tables(cfg, np.arange(plan.context_length))
    stats, outs = calibrate_part(graph, kinds, plan, part, (cfg.num_key_value_heads, cfg.head_dim), hidden_in,
                                 cos, sin, mask_value, hessians, label=part.name,
                                 spill=calib_dir / f"part_{part.index}.stats")
    stats.save(calib_dir / f"part_{part.index}.stats.npz")
    if not part.head:
        tmp = calib_dir / f"part_{part.index}.hidden.partial.npy"
        np.save(tmp, outs)
        tmp.replace(calib_dir / f"part_{part.index}.hidden.npy")


def equalize_stage(part: PartSpec, float_dir: Path, float_info: dict, plan: CalibrationPlan, cfg, calib_dir: Path,
                   mask_value: float, tokens: int = 1024, scale: bool = True, center: bool = True) -> dict:
    """Key-cache equalization (``scale``) and centering (``center``) of one decoder part
    (:mod:`qwen_ondevice.quantize.kv_equalize`): measure the per-channel q/k maxima and the per-channel
    range of the keys after RoPE over the first ``tokens`` calibration tokens, then fold the
    scales into the part's float weights and write the key centers, in place. Returns the
    per-layer report."""
    ar = str(plan.ar)
    graph = float_dir / Path(float_info["graphs"][ar]["file"]).name
    names = qk_output_names(onnx.load(str(graph), load_external_data=False), part.layers)
    kinds = {n: {"range", "channel_range"} for pair in names.values() for n in pair}
    kinds.update({f"past_key_{l}_out": {"range", "key_channel_range"} for l in part.layers})
    S, T = plan.ids.shape
    if T >= tokens:  # the first chunks of the first sequence
        sub = CalibrationPlan(plan.ids[:1, : max(1, -(-tokens // plan.ar)) * plan.ar], plan.ar, plan.context_length)
    else:  # whole sequences
        sub = CalibrationPlan(plan.ids[: min(S, -(-tokens // T))], plan.ar, plan.context_length)
    # chunks are fed sequence by sequence, so the sub-plan's chunks are the first ones of the plan
    hidden_in = np.load(calib_dir / f"part_{part.index - 1}.hidden.npy", mmap_mode="r")[: len(sub.chunks)]
    cos, sin = rope_tables(cfg, np.arange(plan.context_length))
    stats, _ = calibrate_part(graph, kinds, sub, part, (cfg.num_key_value_heads, cfg.head_dim), np.asarray(hidden_in),
                              cos, sin, mask_value, label=f"{part.name} (key equalization)")
    absmax = {n: np.maximum(np.abs(st.channel_lo), np.abs(st.channel_hi)) for n, st in stats.tensors.items()}
    key_ranges = {l: (stats.tensors[f"past_key_{l}_out"].channel_lo, stats.tensors[f"past_key_{l}_out"].channel_hi)
                  for l in part.layers}
    return equalize_part(graph, part.layers, absmax, cfg.num_key_value_heads, cfg.num_key_value_groups, cfg.head_dim,
                         key_ranges, scale=scale, center=center)


def remove_part_intermediates(out: Path, part: PartSpec, float_info: dict) -> None:
    """Delete what no later stage needs once ``part`` of the export into ``out`` is quantized: its
    float graphs and data, its statistics and Hessians, and the hidden states of the part before
    it (its own stay: the next part calibrates on them)."""
    float_dir, calib_dir = work_dir(out, FLOAT), work_dir(out, CALIB)
    for g in float_info["graphs"].values():
        (float_dir / Path(g["file"]).name).unlink(missing_ok=True)
    (float_dir / Path(float_info["data"]).name).unlink(missing_ok=True)
    for f in calib_dir.glob(f"part_{part.index}.stats*"):
        f.unlink()
    (calib_dir / f"part_{part.index - 1}.hidden.npy").unlink(missing_ok=True)


def cleanup(out: Path) -> None:
    """Remove the temporary float graphs and calibration files once the export into ``out`` is complete."""
    for kind in (FLOAT, CALIB):
        shutil.rmtree(work_dir(out, kind), ignore_errors=True)


def summarize_weights(parts: list[dict]) -> dict:
    """Mixed-precision summary for the manifest: which projections kept int8, and why."""
    int8 = {n: w for p in parts for n, w in p.get("weights", {}).items() if is_projection(n) and w["bits"] == 8}
    return {"int8_projections": int8, "count": len(int8)}



