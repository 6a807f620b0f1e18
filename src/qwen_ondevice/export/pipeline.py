"""``qwen-ondevice export``: checkpoint -> bundle folder, in resumable stages.

Stages: ``files`` (config and tokenizer copied), ``plan`` (parts by weight bytes), one stage per
part (its external-data file and its AR graphs), ``manifest`` (sha256 of every file, written
last). Each finished stage is recorded in ``BUNDLE/.export/state.json`` (written atomically);
a re-run with the same options skips finished stages, so an export killed at any point (even by
SIGKILL) resumes from the last finished stage. ``--force`` starts over.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import time
from pathlib import Path

from qwen_ondevice.core.bundle import CHECKPOINT_FILES, MANIFEST, SCHEMA, SCHEMA_VERSION
from qwen_ondevice.core.checkpoint import Checkpoint, load_checkpoint
from qwen_ondevice.core.export_layout import (
    CALIB,
    FLOAT,
    KVEQ,
    MANIFEST_STAGE,
    PART,
    REPORT_STAGE,
    STATE_DIR,
    part_of,
    stage_key,
    work_dir,
)
from qwen_ondevice.core.files import sha256_file
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.onnx_io import ExternalData
from qwen_ondevice.core.parts import MASK_VALUE, PartSpec
from qwen_ondevice.core.progress import format_seconds, log, stage_meter
from qwen_ondevice.core.texts import default_calibration_text, text_token_ids
from qwen_ondevice.export.footprint import Footprint, check_fits, estimate_footprint
from qwen_ondevice.export.onnx_graph import build_part_graph
from qwen_ondevice.export.options import QUANTIZED, ExportOptions, ExportState, check_options, prepare_output
from qwen_ondevice.export.plan import check_weights_present, describe_plan, part_bytes, plan_parts, plan_reason
from qwen_ondevice.export.report import write_report
from qwen_ondevice.qnn.chipsets import check_chipset_option
from qwen_ondevice.qnn.compile import compile_stage
from qwen_ondevice.quantize.calibrate import CalibrationPlan, PartStats
from qwen_ondevice.quantize.rotation import ROTATION_SEED, RotatedWeights
from qwen_ondevice.quantize.stages import (
    FLOAT_RESIDUAL_REASON,
    QuantSettings,
    boundary_encoding,
    calibrate_stage,
    cleanup,
    equalize_stage,
    natural_key,
    quantize_part_graphs,
    remove_part_intermediates,
    summarize_weights,
)


def export(options: ExportOptions, out: Path, force: bool = False) -> Path:
    """Export ``options.model`` into the bundle folder ``out``; returns ``out``.

    Works part by part: only one part's weights are in memory at a time (read from the
    memory-mapped checkpoint), so peak RSS stays near the largest part's weights.

    Raises:
        UserError: bad options, a bad checkpoint, or an ``out`` folder holding something else.
    """
    ckpt = load_checkpoint(options.model)
    check_options(options, ckpt)
    quantized = options.precision in QUANTIZED
    # the calibration text is checked before anything is written: a refusal leaves no folder
    calib_plan = _calibration_plan(ckpt, options) if quantized else None
    cfg = ckpt.config
    # whether this machine holds the plan, before anything is written (a resume has the same plan)
    check_weights_present(ckpt.weights, cfg)
    if options.rotate:  # exact in float: the graphs read the rotated weights (quantize/rotation.py)
        ckpt = ckpt.with_weights(RotatedWeights(ckpt.weights, cfg.hidden_size, ROTATION_SEED,
                                                head_dim=cfg.head_dim if options.rotate_heads else None))
    planned = plan_parts(cfg, options.precision, options.num_parts, options.max_part_bytes)
    fp = export_footprint(cfg, planned, options)
    log(f"[fit] {fp.describe()}")
    check_fits(fp, out, cfg, planned)
    state = prepare_output(out, options, force)

    if "files" not in state.done:
        with stage_meter("files") as rec:
            copy_checkpoint_files(ckpt.path, out)
        state.mark("files", _measured(rec))

    if "plan" not in state.done:
        state.mark("plan", {"parts": [p.to_dict() for p in planned]})
    parts = [PartSpec.from_dict(p, len(state.done["plan"]["parts"])) for p in state.done["plan"]["parts"]]
    reason = plan_reason(cfg, options.precision, parts, options.num_parts, options.max_part_bytes)
    log(f"[plan] {len(parts)} parts at {options.precision}:\n" + describe_plan(cfg, options.precision, parts) + f"\n[plan] {reason}")

    (out / "onnx").mkdir(exist_ok=True)
    for part in parts:
        stage = stage_key(PART, part.name)
        if stage in state.done:
            log(f"[onnx] {part.name}: done earlier, skipped")
            continue
        if quantized:
            info = _quantized_part(ckpt, part, options, out, state, calib_plan)
        else:
            with stage_meter(stage) as rec:
                info = export_part(ckpt, part, options.ar_lengths, options.context_length, options.precision, out / "onnx")
            info.update(_measured(rec))
        ckpt.weights.release()
        state.mark(stage, info)
        if quantized and not options.keep_intermediates:
            remove_part_intermediates(out, part, state.done[stage_key(FLOAT, part.name)])
        _stage_delay()
    if quantized and not options.keep_intermediates:
        cleanup(out)

    extra = compile_stage(out, ckpt, options, parts, state)  # QNN context binaries + Genie files
    if options.eval_tokens > 0 and REPORT_STAGE not in state.done:
        manifest = {**build_manifest(out, ckpt, options, parts, state), **extra}
        with stage_meter(REPORT_STAGE) as rec:
            summary = write_report(out, manifest, options.eval_tokens, options.eval_window,
                                   options.fidelity_prompts, options.fidelity_tokens)
        state.mark(REPORT_STAGE, {**summary, **_measured(rec)})
    with stage_meter(MANIFEST_STAGE) as rec:
        write_manifest(out, ckpt, options, parts, state, extra)
    state.mark(MANIFEST_STAGE, _measured(rec))
    log(format_stage_table(state.done))
    return out


def _measured(rec) -> dict:
    return {"seconds": rec.seconds, "peak_rss_bytes": rec.peak_rss_bytes, "start_rss_bytes": rec.start_rss_bytes,
            "written_bytes": rec.written_bytes}


def format_stage_table(done: dict[str, dict]) -> str:
    """The export's summary: one row per stage stamped with a wall time (this run's and earlier
    runs' of a resumed export), its peak RSS, and the total."""
    rows = [(k, v.get("seconds", v.get("compile_seconds")), v.get("peak_rss_bytes")) for k, v in done.items()
            if isinstance(v, dict) and ("seconds" in v or "compile_seconds" in v)]
    # a part's key equalization is stamped after its float graphs (with them), but ran after them
    order = {name: i for i, name in enumerate(k for k, *_ in rows)}

    def position(key: str) -> float:
        part = part_of(key, KVEQ)
        return order[stage_key(FLOAT, part)] + 0.5 if part is not None and stage_key(FLOAT, part) in order else order[key]

    rows.sort(key=lambda r: position(r[0]))
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'wall time':>12}  {'peak RSS':>9}"]
    for name, sec, rss in rows:
        lines.append(f"{name:<{width}}  {format_seconds(sec):>12}  {(f'{rss / 1e9:.2f} GB' if rss else '-'):>9}")
    peak = max((r[2] or 0 for r in rows), default=0)
    lines.append(f"{'total':<{width}}  {format_seconds(sum(r[1] for r in rows)):>12}  {peak / 1e9:>6.2f} GB")
    return "\n".join(lines)


def export_footprint(cfg, parts: list[PartSpec], options: ExportOptions) -> Footprint:
    """:func:`qwen_ondevice.export.footprint.estimate_footprint` of this export's plan and options."""
    quantized = options.precision in QUANTIZED
    return estimate_footprint(cfg, parts, precision=options.precision, prompt_length=options.prompt_length,
                              context_length=options.context_length,
                              calibration_tokens=options.calibration_tokens if quantized else 0,
                              eval_tokens=options.eval_tokens, eval_window=options.eval_window,
                              compile=quantized and check_chipset_option(options.chipset, options.precision) is not None,
                              gptq=quantized and options.weight_method == "gptq", quantized=quantized,
                              fidelity_prompts=options.fidelity_prompts)


def _calibration_plan(ckpt: Checkpoint, options: ExportOptions):
    path = Path(options.calibration_text) if options.calibration_text else default_calibration_text()
    ids = text_token_ids(ckpt.load_tokenizer(), path, options.calibration_tokens, "calibration")
    return CalibrationPlan.from_tokens(ids, options.prompt_length, options.context_length)


def _quantized_part(ckpt: Checkpoint, part: PartSpec, options: ExportOptions, out: Path, state: "ExportState", plan) -> dict:
    """float graphs (+ key equalization) -> calibration -> QDQ graphs for one part.

    Each step is a stage stamped only after its files are complete. Key equalization rewrites
    the float weights in place, so it is not a stage of its own: the float stage is stamped
    after it, and an export killed anywhere before that stamp writes the float graphs again.
    """
    float_dir, calib_dir = work_dir(out, FLOAT), work_dir(out, CALIB)
    float_dir.mkdir(parents=True, exist_ok=True)
    calib_dir.mkdir(parents=True, exist_ok=True)
    settings = QuantSettings(options.precision, options.weight_method, options.int8_fraction, options.weight_block_size,
                             options.smooth_alpha, options.down_proj_headroom, key_minmax=options.key_center,
                             float_residual=options.residual == "fp16", kv_dtype=options.kv_cache,
                             lm_head_bits=4 if options.lm_head_precision == "int4" else 8,
                             int8_projections=options.int8_projection_kinds)
    if stage_key(FLOAT, part.name) not in state.done:
        with stage_meter(stage_key(FLOAT, part.name)) as rec:
            info = export_part(ckpt, part, options.ar_lengths, options.context_length, "fp32", float_dir, options.key_center)
        info.update(_measured(rec))
        if (options.kv_equalize or options.key_center) and len(part.layers):
            with stage_meter(stage_key(KVEQ, part.name)) as rec:
                report = equalize_stage(part, float_dir, info, plan, ckpt.config, calib_dir, MASK_VALUE,
                                        scale=options.kv_equalize, center=options.key_center)
            state.mark(stage_key(KVEQ, part.name), {**_measured(rec), "layers": report})
            worst = max(report.values(), key=lambda r: r["key_absmax_before"])
            log(f"[kv-equalize] {part.name}: largest |key| {worst['key_absmax_before']:.3g} -> "
                f"{max(r['key_absmax_after'] for r in report.values()):.3g}"
                + (" (per-pair scales" + (", centered)" if options.key_center else ")") if options.kv_equalize else " (centered)"))
        state.mark(stage_key(FLOAT, part.name), info)
    float_info = state.done[stage_key(FLOAT, part.name)]
    if stage_key(CALIB, part.name) not in state.done:
        with stage_meter(stage_key(CALIB, part.name)) as rec:
            calibrate_stage(part, float_dir, float_info, plan, ckpt.config, calib_dir,
                            hessians=options.weight_method == "gptq", mask_value=MASK_VALUE)
        state.mark(stage_key(CALIB, part.name), {**_measured(rec), "tokens": int(plan.ids.size)})
        _stage_delay()
    log(f"[quantize] {part.name}: {options.precision} ({options.weight_method})")
    stats = PartStats.load(calib_dir / f"part_{part.index}.stats.npz")
    producer = state.done[stage_key(PART, PartSpec(part.index - 1, part.num_parts, range(0)).name)] if part.hidden_in else None
    with stage_meter(stage_key(PART, part.name)) as rec:
        info = quantize_part_graphs(part, float_dir, float_info, stats, settings, out / "onnx", MASK_VALUE,
                                    boundary_encoding(producer, part.hidden_in) if producer else None)
    info.update(_measured(rec))
    if stage_key(KVEQ, part.name) in state.done:
        info["kv_equalization"] = state.done[stage_key(KVEQ, part.name)]["layers"]
    return info


def export_part(ckpt: Checkpoint, part: PartSpec, ar_lengths: list[int], context_length: int, precision: str,
                onnx_dir: Path, key_center: bool = False) -> dict:
    """Write ``<onnx_dir>/<part>.data`` and one float graph per AR; returns the part's manifest
    entry (file paths relative to the bundle, ``onnx/...``).

    Files are written under temporary names and renamed at the end, so a killed export never
    leaves a file that looks finished.
    """
    onnx_dir.mkdir(parents=True, exist_ok=True)
    data_name = f"{part.name}.data"
    tmp_data = onnx_dir / (data_name + ".partial")
    data = ExternalData(tmp_data)
    data.location = data_name  # graphs reference the final name
    graphs = {}
    tmp_files = []
    try:
        for ar in ar_lengths:
            log(f"[onnx] {part.name}: AR-{ar} {precision} graph (CL {context_length})")
            model, inputs, outputs = build_part_graph(ckpt.config, ckpt.weights, part, ar, context_length, data, precision,
                                                      key_center)
            fname = f"{part.name}.ar{ar}.onnx"
            tmp = onnx_dir / (fname + ".partial")
            tmp.write_bytes(model.SerializeToString())
            tmp_files.append((tmp, onnx_dir / fname))
            graphs[str(ar)] = {
                "file": f"onnx/{fname}",
                "inputs": [i.to_dict() for i in inputs],
                "outputs": [o.to_dict() for o in outputs],
            }
            del model
    finally:
        data.close()
    for tmp, final in tmp_files:
        os.replace(tmp, final)
    os.replace(tmp_data, onnx_dir / data_name)
    return {
        **part.to_dict(),
        "data": f"onnx/{data_name}",
        "weight_bytes": data.nbytes,
        "graphs": graphs,
    }


def copy_checkpoint_files(src: Path, out: Path) -> None:
    """Copy config, tokenizer and generation config; the chat template is written into
    ``tokenizer_config.json`` too when the checkpoint keeps it in ``chat_template.jinja``."""
    for name in CHECKPOINT_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    tc_path = out / "tokenizer_config.json"
    jinja = src / "chat_template.jinja"
    if tc_path.exists() and jinja.exists():
        tc = json.loads(tc_path.read_text())
        if not tc.get("chat_template"):
            tc["chat_template"] = jinja.read_text()
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False))


def _quantization_summary(options: ExportOptions, parts: list[dict]) -> dict | None:
    if options.precision not in QUANTIZED:
        return None
    return {
        "precision": options.precision,
        "weights": {"projections": f"int{4 if options.precision == 'w4a16' else 8} symmetric "
                    + (f"per block of {options.weight_block_size} input rows" if options.weight_block_size and options.precision == "w4a16" else "per output channel"),
                    "lm_head": "int8 symmetric per output channel" if options.lm_head_precision == "int8" else "int4 as the projections", "embedding": "int8 symmetric per row",
                    "int8_projections": list(options.int8_projection_kinds) if options.precision == "w4a16" else [],
                    "norms_and_biases": "uint16 per tensor", "method": options.weight_method},
        "activations": "uint16 asymmetric per tensor"
        + ("; the residual stream float (fp16 on the HTP), see float_islands" if options.residual == "fp16" else "")
        + (f"; MLP down_proj input range widened {options.down_proj_headroom:g}x" if options.down_proj_headroom != 1 else ""), "kv_cache": f"{options.kv_cache} per layer, in/out share one encoding",
        "rotation": {"residual_stream": "random orthogonal (Haar), folded into the weights", "seed": ROTATION_SEED,
                     "heads": "Hadamard per head, folded into v_proj and o_proj" if options.rotate_heads else None}
        if options.rotate else None,
        "calibration": {"text": options.calibration_text or "wikitext2_valid.txt (shipped)", "tokens": options.calibration_tokens},
        "mixed_precision": summarize_weights(parts),
        "smoothing": {"down_proj_input": "SmoothQuant, folded into up_proj/down_proj", "alpha": options.smooth_alpha}
        if options.smooth_alpha > 0 else None,
        "float_islands": [{"tensors": sorted({t for p in parts for t in p.get("float_tensors", [])}, key=natural_key),
                           "reason": FLOAT_RESIDUAL_REASON}] if options.residual == "fp16" else [],
    }


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("qwen-ondevice", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-qnn", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def write_manifest(out: Path, ckpt: Checkpoint, options: ExportOptions, parts: list[PartSpec], state: ExportState,
                   extra: dict | None = None) -> None:
    """Write ``manifest.json`` last: :func:`build_manifest` (plus ``extra`` sections, e.g. ``qnn``)
    and the sha256 of every file."""
    manifest = {**build_manifest(out, ckpt, options, parts, state), **(extra or {})}
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith(STATE_DIR) and rel != MANIFEST:
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["files"] = files
    write_json(out / MANIFEST, manifest, indent=1)
    log(f"[manifest] {out / MANIFEST}: {len(files)} files, {sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB")


def build_manifest(out: Path, ckpt: Checkpoint, options: ExportOptions, parts: list[PartSpec], state: ExportState) -> dict:
    """The manifest without its file list: config, precision, AR list, CL, parts with their I/O
    signatures (and encodings), quantization summary, tool versions."""
    cfg = ckpt.config
    float_dtype = "float16" if options.precision == "fp16" else "float32"
    kv_dtype = options.kv_cache if options.precision in QUANTIZED else float_dtype
    part_entries = []
    for p in parts:
        info = dict(state.done[stage_key(PART, p.name)])
        for key in ("seconds", "peak_rss_bytes", "start_rss_bytes", "written_bytes"):
            info.pop(key, None)
        info["planned_weight_bytes"] = part_bytes(cfg, options.precision, p)
        part_entries.append(info)
    kv_per_token = cfg.kv_cache_bytes_per_token({"uint8": 1, "uint16": 2, "float16": 2, "float32": 4}[kv_dtype])
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "source": ckpt.source,
            "config": cfg.to_dict(),
            "config_json": json.loads((out / "config.json").read_text()),
        },
        "precision": options.precision,
        "ar": options.ar_lengths,
        "context_length": options.context_length,
        "mask_value": MASK_VALUE,
        "kv_cache": {
            "dtype": kv_dtype,
            "key_layout": "(KVH, 1, D, P)",
            "value_layout": "(KVH, 1, P, D)",
            "bytes_per_token": kv_per_token,
        },
        "parts": part_entries,
        "plan": {"reason": plan_reason(cfg, options.precision, parts, options.num_parts, options.max_part_bytes)},
        "quantization": _quantization_summary(options, part_entries),
        "export": {"stages": {k: v for k, v in state.done.items() if part_of(k, PART) is not None or k == "files"}},
        "tools": tool_versions(),
        "files": {},
    }
    return manifest


def _stage_delay() -> None:
    """Sleep ``$QWEN_ONDEVICE_EXPORT_STAGE_DELAY`` seconds after a stage (lets tests kill an
    export between stages deterministically)."""
    delay = float(os.environ.get("QWEN_ONDEVICE_EXPORT_STAGE_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)

