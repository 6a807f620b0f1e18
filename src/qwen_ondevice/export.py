"""``qwen-ondevice export``: checkpoint -> bundle folder, in resumable stages.

Stages: ``files`` (config and tokenizer copied), ``plan`` (parts by weight bytes), one stage per
part (its external-data file and its AR graphs), ``manifest`` (sha256 of every file, written
last). Each finished stage is recorded in ``BUNDLE/.export/state.json`` (written atomically);
a re-run with the same options skips finished stages, so an export killed at any point (even by
SIGKILL) resumes from the last finished stage. ``--force`` starts over.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import CHECKPOINT_FILES, MANIFEST, SCHEMA, SCHEMA_VERSION
from .checkpoint import Checkpoint, load_checkpoint
from .compile import DEFAULT_HTP_OPTIMIZATION, HTP_OPTIMIZATION_LEVELS
from .demo import sha256_file
from .encodings import KV_CACHE_DTYPE
from .errors import UserError
from .footprint import Footprint, check_fits, estimate_footprint
from .jsonio import write_json
from .parts import MASK_VALUE, PartSpec
from .plan import check_weights_present, describe_plan, part_bytes, plan_parts, plan_reason
from .progress import format_seconds, log, stage_meter

STATE_DIR = ".export"
PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16")
QUANTIZED = ("w8a16", "w4a16")
DEFAULT_PRECISION = "w4a16"
DEFAULT_CALIBRATION_TOKENS = 4096
#: w4a16 int4 block size: on the demo model, blocks of 32 give +6.4% perplexity and 88.3% top-1
#: against float over 16,368 WikiText-2 tokens, where one scale per output channel gave +15.7% /
#: 79.7% (README "Accuracy"). 32 is also the block of the GGUF Q4_K weights the demo comes from.
DEFAULT_WEIGHT_BLOCK_SIZE = 32


@dataclass
class ExportOptions:
    """What ``export`` was asked for; a resume must be asked for the same."""

    model: str
    precision: str = DEFAULT_PRECISION
    prompt_length: int = 128
    context_length: int = 4096
    num_parts: int | None = None
    max_part_bytes: int | None = None
    calibration_text: str | None = None  # None: the WikiText-2 validation text shipped with the package
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    weight_method: str = "gptq"
    int8_fraction: float = 0.1
    # w4a16: int4 scales per block of this many input rows, on the LPBQ grid (weight_quant.lpbq_scales);
    # None: one scale per output channel
    weight_block_size: int | None = DEFAULT_WEIGHT_BLOCK_SIZE
    smooth_alpha: float = 0.0  # SmoothQuant strength for the MLP down_proj input (0: off; smoothing.py)
    down_proj_headroom: float = 1.0  # uint16 range of the down_proj input, widened (qdq.activation_encodings)
    kv_equalize: bool = True  # per-RoPE-pair key scales folded into q_proj/k_proj before calibration (kv_equalize.py)
    key_center: bool = True  # keys stored minus their calibrated per-channel midrange (kv_equalize.py)
    residual: str = "fp16"  # the residual stream's precision: "fp16" (float, fp16 on the HTP) or "uint16"
    eval_tokens: int = 2048  # held-out tokens scored for report.json (0 skips the accuracy report)
    eval_window: int = 1024
    chipset: str = "snapdragon-8-elite"  # QNN context binaries for this chipset; "none" skips (compile.py)
    htp_optimization: int = DEFAULT_HTP_OPTIMIZATION  # HTP graph finalization level (compile.py): 3 ships, 1 builds fastest
    keep_intermediates: bool = False  # keep the float graphs and calibration files in BUNDLE/.export

    @property
    def ar_lengths(self) -> list[int]:
        return [self.prompt_length, 1] if self.prompt_length != 1 else [1]


#: Options that change no graph and no weight. A resume asked for other values keeps every
#: finished part and redoes only the stages they decide: the accuracy report (``eval_*``) and
#: the context binaries of the chipset at the optimization level asked (``chipset``,
#: ``htp_optimization``); binaries already compiled for another chipset stay in the bundle.
FINISHING_OPTIONS = {"eval_tokens": ("report",), "eval_window": ("report",), "chipset": (), "htp_optimization": (),
                     "keep_intermediates": ()}


def _graph_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in FINISHING_OPTIONS}


class ExportState:
    """The stamps of finished stages, in ``BUNDLE/.export/state.json``."""

    def __init__(self, out: Path, options: ExportOptions):
        self.path = out / STATE_DIR / "state.json"
        self.options = asdict(options)
        self.done: dict[str, dict] = {}

    def load(self) -> bool:
        """Load an earlier state; True when it exists and was made with the same graph options
        (all but :data:`FINISHING_OPTIONS`). Stages that a changed finishing option decides are
        dropped, so they run again; the manifest is always rewritten then."""
        if not self.path.exists():
            return False
        state = json.loads(self.path.read_text())
        earlier = state.get("options") or {}
        if _graph_options(earlier) != _graph_options(self.options):
            return False
        self.done = state.get("done", {})
        changed = [k for k in FINISHING_OPTIONS if k in earlier and earlier[k] != self.options[k]]
        if changed:
            log("resume with other " + ", ".join(f"--{k.replace('_', '-')} ({earlier[k]} -> {self.options[k]})" for k in changed)
                + ": the finished parts are kept")
            for stage in {"manifest", *(s for k in changed for s in FINISHING_OPTIONS[k])}:
                self.done.pop(stage, None)
        return True

    def mark(self, stage: str, info: dict | None = None) -> None:
        self.done[stage] = info or {}
        self._write()

    def forget(self, stages) -> None:
        """Drop the stamps of ``stages`` (their files are about to be rewritten)."""
        for stage in list(stages):
            self.done.pop(stage, None)
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"options": self.options, "done": self.done}, indent=1)


def prepare_output(out: Path, options: ExportOptions, force: bool) -> ExportState:
    """Make ``out`` ready: new, resumable (same options) or, with ``force``, emptied.

    Raises:
        UserError: ``out`` is a file, or a non-empty folder that is not an export with the same
            options (nothing is touched then).
    """
    state = ExportState(out, options)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if force and out.exists():
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        if state.load():
            log(f"resuming the export in {out} (finished: {', '.join(state.done) or 'nothing'})")
            return state
        what = "an export with other options" if (out / STATE_DIR).exists() or (out / MANIFEST).exists() else "other files"
        raise UserError(f"{out}: folder holds {what}; choose another --out or pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    return state


def check_options(options: ExportOptions, ckpt: Checkpoint) -> None:
    """Raises UserError for an unknown precision, AR >= CL, or CL beyond the checkpoint."""
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.prompt_length < 1 or options.prompt_length >= options.context_length:
        raise UserError(
            f"--prompt-length (AR) {options.prompt_length} must be at least 1 and below --context-length (CL) {options.context_length}"
        )
    if options.context_length > ckpt.config.max_position_embeddings:
        raise UserError(
            f"--context-length {options.context_length} exceeds what the checkpoint reaches "
            f"(max_position_embeddings {ckpt.config.max_position_embeddings})"
        )
    from .compile import check_chipset_option

    check_chipset_option(options.chipset, options.precision)


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
        stage = f"part:{part.name}"
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
            from .quant_export import remove_part_intermediates

            remove_part_intermediates(out / STATE_DIR, part, state.done[f"float:{part.name}"])
        _stage_delay()
    if quantized and not options.keep_intermediates:
        from .quant_export import cleanup

        cleanup(out / STATE_DIR)

    from .compile import compile_stage

    extra = compile_stage(out, ckpt, options, parts, state)  # QNN context binaries + Genie files
    if options.eval_tokens > 0 and "report" not in state.done:
        from .report import write_report

        manifest = {**build_manifest(out, ckpt, options, parts, state), **extra}
        with stage_meter("report") as rec:
            summary = write_report(out, manifest, options.eval_tokens, options.eval_window)
        state.mark("report", {**summary, **_measured(rec)})
    with stage_meter("manifest") as rec:
        write_manifest(out, ckpt, options, parts, state, extra)
    state.mark("manifest", _measured(rec))
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
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'wall time':>12}  {'peak RSS':>9}"]
    for name, sec, rss in rows:
        lines.append(f"{name:<{width}}  {format_seconds(sec):>12}  {(f'{rss / 1e9:.2f} GB' if rss else '-'):>9}")
    peak = max((r[2] or 0 for r in rows), default=0)
    lines.append(f"{'total':<{width}}  {format_seconds(sum(r[1] for r in rows)):>12}  {peak / 1e9:>6.2f} GB")
    return "\n".join(lines)


def export_footprint(cfg, parts: list[PartSpec], options: ExportOptions) -> Footprint:
    """:func:`qwen_ondevice.footprint.estimate_footprint` of this export's plan and options."""
    from .compile import check_chipset_option

    quantized = options.precision in QUANTIZED
    return estimate_footprint(cfg, parts, precision=options.precision, prompt_length=options.prompt_length,
                              context_length=options.context_length,
                              calibration_tokens=options.calibration_tokens if quantized else 0,
                              eval_tokens=options.eval_tokens, eval_window=options.eval_window,
                              compile=quantized and check_chipset_option(options.chipset, options.precision) is not None,
                              gptq=quantized and options.weight_method == "gptq", quantized=quantized)


def _calibration_plan(ckpt: Checkpoint, options: ExportOptions):
    from .calibrate import CalibrationPlan, default_calibration_text, text_token_ids

    path = Path(options.calibration_text) if options.calibration_text else default_calibration_text()
    ids = text_token_ids(ckpt.load_tokenizer(), path, options.calibration_tokens, "calibration")
    return CalibrationPlan.from_tokens(ids, options.prompt_length, options.context_length)


def _quantized_part(ckpt: Checkpoint, part: PartSpec, options: ExportOptions, out: Path, state: "ExportState", plan) -> dict:
    """float graphs (+ key equalization) -> calibration -> QDQ graphs for one part.

    Each step is a stage stamped only after its files are complete. Key equalization rewrites
    the float weights in place, so it is not a stage of its own: the float stage is stamped
    after it, and an export killed anywhere before that stamp writes the float graphs again.
    """
    from .quant_export import QuantSettings, boundary_encoding, calibrate_stage, quantize_part_graphs
    from .calibrate import PartStats

    state_dir = out / STATE_DIR
    float_dir, calib_dir = state_dir / "float", state_dir / "calib"
    float_dir.mkdir(parents=True, exist_ok=True)
    calib_dir.mkdir(parents=True, exist_ok=True)
    settings = QuantSettings(options.precision, options.weight_method, options.int8_fraction, options.weight_block_size,
                             options.smooth_alpha, options.down_proj_headroom, key_minmax=options.key_center,
                             float_residual=options.residual == "fp16")
    if f"float:{part.name}" not in state.done:
        with stage_meter(f"float:{part.name}") as rec:
            info = export_part(ckpt, part, options.ar_lengths, options.context_length, "fp32", float_dir, options.key_center)
        info.update(_measured(rec))
        if (options.kv_equalize or options.key_center) and len(part.layers):
            from .quant_export import equalize_stage

            with stage_meter(f"kveq:{part.name}") as rec:
                report = equalize_stage(part, float_dir, info, plan, ckpt.config, calib_dir, MASK_VALUE,
                                        scale=options.kv_equalize, center=options.key_center)
            state.mark(f"kveq:{part.name}", {**_measured(rec), "layers": report})
            worst = max(report.values(), key=lambda r: r["key_absmax_before"])
            log(f"[kv-equalize] {part.name}: largest |key| {worst['key_absmax_before']:.3g} -> "
                f"{max(r['key_absmax_after'] for r in report.values()):.3g}"
                + (" (per-pair scales" + (", centered)" if options.key_center else ")") if options.kv_equalize else " (centered)"))
        state.mark(f"float:{part.name}", info)
    float_info = state.done[f"float:{part.name}"]
    if f"calib:{part.name}" not in state.done:
        with stage_meter(f"calib:{part.name}") as rec:
            calibrate_stage(part, float_dir, float_info, plan, ckpt.config, calib_dir,
                            hessians=options.weight_method == "gptq", mask_value=MASK_VALUE)
        state.mark(f"calib:{part.name}", {**_measured(rec), "tokens": int(plan.ids.size)})
        _stage_delay()
    log(f"[quantize] {part.name}: {options.precision} ({options.weight_method})")
    stats = PartStats.load(calib_dir / f"part_{part.index}.stats.npz")
    producer = state.done[f"part:{PartSpec(part.index - 1, part.num_parts, range(0)).name}"] if part.hidden_in else None
    with stage_meter(f"part:{part.name}") as rec:
        info = quantize_part_graphs(part, float_dir, float_info, stats, settings, out / "onnx", MASK_VALUE,
                                    boundary_encoding(producer, part.hidden_in) if producer else None)
    info.update(_measured(rec))
    if f"kveq:{part.name}" in state.done:
        info["kv_equalization"] = state.done[f"kveq:{part.name}"]["layers"]
    return info


def export_part(ckpt: Checkpoint, part: PartSpec, ar_lengths: list[int], context_length: int, precision: str,
                onnx_dir: Path, key_center: bool = False) -> dict:
    """Write ``<onnx_dir>/<part>.data`` and one float graph per AR; returns the part's manifest
    entry (file paths relative to the bundle, ``onnx/...``).

    Files are written under temporary names and renamed at the end, so a killed export never
    leaves a file that looks finished.
    """
    from .onnx_graph import ExternalData, build_part_graph

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
    from .quant_export import FLOAT_RESIDUAL_REASON, natural_key, summarize_weights

    return {
        "precision": options.precision,
        "weights": {"projections": f"int{4 if options.precision == 'w4a16' else 8} symmetric "
                    + (f"per block of {options.weight_block_size} input rows" if options.weight_block_size and options.precision == "w4a16" else "per output channel"),
                    "lm_head": "int8 symmetric per output channel", "embedding": "int8 symmetric per row",
                    "norms_and_biases": "uint16 per tensor", "method": options.weight_method},
        "activations": "uint16 asymmetric per tensor"
        + ("; the residual stream float (fp16 on the HTP), see float_islands" if options.residual == "fp16" else "")
        + (f"; MLP down_proj input range widened {options.down_proj_headroom:g}x" if options.down_proj_headroom != 1 else ""), "kv_cache": f"{KV_CACHE_DTYPE} per layer, in/out share one encoding",
        "calibration": {"text": options.calibration_text or "wikitext2_valid.txt (shipped)", "tokens": options.calibration_tokens},
        "mixed_precision": summarize_weights(parts),
        "smoothing": {"down_proj_input": "SmoothQuant, folded into up_proj/down_proj", "alpha": options.smooth_alpha}
        if options.smooth_alpha > 0 else None,
        "float_islands": [{"tensors": sorted({t for p in parts for t in p.get("float_tensors", [])}, key=natural_key),
                           "reason": FLOAT_RESIDUAL_REASON}] if options.residual == "fp16" else [],
    }


def tool_versions() -> dict:
    import importlib.metadata as md

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
    kv_dtype = KV_CACHE_DTYPE if options.precision in QUANTIZED else float_dtype
    part_entries = []
    for p in parts:
        info = dict(state.done[f"part:{p.name}"])
        for key in ("seconds", "peak_rss_bytes", "start_rss_bytes", "written_bytes"):
            info.pop(key, None)
        info["planned_weight_bytes"] = part_bytes(cfg, options.precision, p)
        part_entries.append(info)
    kv_per_token = cfg.kv_cache_bytes_per_token({KV_CACHE_DTYPE: 1, "float16": 2, "float32": 4}[kv_dtype])
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
        "export": {"stages": {k: v for k, v in state.done.items() if k.startswith("part:") or k == "files"}},
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


def register_cli(sub) -> None:
    """Add ``export`` to the CLI's subparsers."""
    p = sub.add_parser("export", help="export MODEL to an on-device bundle folder")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, .gguf file, 'demo' or a Hub id")
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS, help=f"default {DEFAULT_PRECISION}")
    p.add_argument("--calibration-text", default=None, help="plain-text file for calibration (default: WikiText-2 validation, shipped)")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS)
    p.add_argument("--weight-method", choices=["mse", "gptq"], default="gptq",
                   help="weight rounding after the per-channel MSE clipping search: GPTQ (default) or plain rounding (mse)")
    p.add_argument("--int8-fraction", type=float, default=0.1,
                   help="w4a16: share of projection weights kept at int8, chosen by measured int4 error (default 0.1)")
    p.add_argument("--prompt-length", type=int, default=128, help="AR of the prompt processor (default 128)")
    p.add_argument("--context-length", type=int, default=4096, help="CL (default 4096)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-parts", type=int, help="total parts, embedding included")
    g.add_argument("--max-part-bytes", type=int, help="cap on a part's weight bytes (default 1 GiB)")
    p.add_argument("--weight-block-size", type=int, default=DEFAULT_WEIGHT_BLOCK_SIZE,
                   help=f"w4a16: int4 scales per block of this many input rows, LPBQ-style (a float scale per "
                        f"output channel times a 4-bit integer per block; default {DEFAULT_WEIGHT_BLOCK_SIZE}); "
                        "0: one scale per output channel (smaller, less accurate)")
    p.add_argument("--smooth-alpha", type=float, default=0.0,
                   help="SmoothQuant strength (e.g. 0.5) for the MLP down_proj input, folded into "
                        "up_proj/down_proj (exact in float; default 0: off)")
    p.add_argument("--down-proj-headroom", type=float, default=1.0,
                   help="widen the calibrated uint16 range of the MLP down_proj input this many times (e.g. 4: "
                        "better ONNX Runtime CPU accuracy, but the HTP then departs further from it; default 1)")
    p.add_argument("--no-kv-equalize", dest="kv_equalize", action="store_false",
                   help="keep q_proj/k_proj as they are (by default per-RoPE-pair key scales are folded into "
                        "them so the uint8 key cache spends its levels evenly; exact in float)")
    p.add_argument("--no-key-center", dest="key_center", action="store_false",
                   help="store the keys as they are (by default each layer's keys are stored minus their calibrated "
                        "per-channel midrange, which softmax ignores: smaller scores and a finer uint8 key cache)")
    p.add_argument("--residual", choices=("fp16", "uint16"), default="fp16",
                   help="precision of the residual stream between the decoder layers: fp16 (default; float32 "
                        "on the host) or uint16 per tensor like the other activations (coarse: its range is set "
                        "by the attention-sink token's massive activations)")
    p.add_argument("--eval-tokens", type=int, default=2048,
                   help="held-out tokens scored against the float model for report.json (0 skips; default 2048)")
    p.add_argument("--eval-window", type=int, default=1024, help="window of the accuracy report (capped at CL)")
    p.add_argument("--chipset", default="snapdragon-8-elite",
                   help="compile QNN context binaries for this Snapdragon chipset (quantized precisions; default "
                        "snapdragon-8-elite); 'none' skips")
    p.add_argument("--htp-optimization", type=int, choices=HTP_OPTIMIZATION_LEVELS, default=DEFAULT_HTP_OPTIMIZATION,
                   help="HTP graph finalization optimization of the context binaries: 3 (default) the most optimized "
                        "for the device and the slowest to compile, 1 the fastest compile (development builds)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="keep the float graphs and calibration statistics in OUT/.export (deleted as soon as no "
                        "stage needs them by default; a part of Qwen2-7B is several GB of each)")
    p.add_argument("--force", action="store_true", help="overwrite the --out folder and start over")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    options = ExportOptions(
        model=str(args.model),
        precision=args.precision,
        prompt_length=args.prompt_length,
        context_length=args.context_length,
        num_parts=args.num_parts,
        max_part_bytes=args.max_part_bytes,
        calibration_text=args.calibration_text,
        calibration_tokens=args.calibration_tokens,
        weight_method=args.weight_method,
        int8_fraction=args.int8_fraction,
        weight_block_size=args.weight_block_size or None,
        smooth_alpha=args.smooth_alpha,
        down_proj_headroom=args.down_proj_headroom,
        kv_equalize=args.kv_equalize,
        key_center=args.key_center,
        residual=args.residual,
        eval_tokens=args.eval_tokens,
        eval_window=args.eval_window,
        chipset=args.chipset,
        htp_optimization=args.htp_optimization,
        keep_intermediates=args.keep_intermediates,
    )
    t0 = time.perf_counter()
    out = export(options, args.out, force=args.force)
    log(f"exported {options.model} to {out} in {time.perf_counter() - t0:.1f} s")
    print(out)
    return 0
