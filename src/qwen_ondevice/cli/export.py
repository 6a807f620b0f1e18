"""``qwen-ondevice export MODEL --out BUNDLE``: the export pipeline's options as command-line flags."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qwen_ondevice.core.progress import log
from qwen_ondevice.export.options import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_INT8_PROJECTIONS,
    DEFAULT_PRECISION,
    DEFAULT_WEIGHT_BLOCK_SIZE,
    PRECISIONS,
)
from qwen_ondevice.qnn.ep_options import DEFAULT_HTP_OPTIMIZATION, HTP_OPTIMIZATION_LEVELS


def register(sub) -> None:
    """Add ``export`` to the CLI's subparsers."""
    p = sub.add_parser("export", help="export MODEL to an on-device bundle folder")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, .gguf file, 'demo' or a Hub id")
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS, help=f"default {DEFAULT_PRECISION}")
    p.add_argument("--calibration-text", default=None, help="plain-text file for calibration (default: WikiText-2 validation, shipped)")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   help=f"tokens of the calibration text (default {DEFAULT_CALIBRATION_TOKENS}; fewer export faster: "
                        "calibration runs every layer over every token)")
    p.add_argument("--weight-method", choices=["mse", "gptq"], default="gptq",
                   help="weight rounding after the per-channel MSE clipping search: GPTQ (default) or plain rounding (mse)")
    p.add_argument("--int8-fraction", type=float, default=0.0,
                   help="w4a16: share of the other projection weights also kept at int8, chosen by measured int4 "
                        "error (default 0; 0.1 costs about 0.33 GB more per Qwen2-7B token)")
    p.add_argument("--int8-projections", default=DEFAULT_INT8_PROJECTIONS, metavar="KINDS",
                   help="w4a16: projection kinds kept at int8 in every layer, comma-separated, or 'none' (default "
                        f"{DEFAULT_INT8_PROJECTIONS}: about 0.19 GB more per Qwen2-7B token, paid for by the int4 lm_head)")
    p.add_argument("--prompt-length", type=int, default=128, help="AR of the prompt processor (default 128)")
    p.add_argument("--context-length", type=int, default=4096, help="CL (default 4096)")
    p.add_argument("--verify-tokens", type=int, default=0, metavar="K",
                   help="add an AR-(K+1) verify graph to each part, sharing its weights, for speculative decoding "
                        "(generate/chat/serve --draft); 0: none (default)")
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
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="fold a random orthogonal rotation of the residual stream into the weights (exact in float; "
                        "spreads the outlier channels that activation and weight quantization meet, as QuaRot does); "
                        "default on at w4a16, off at the other precisions")
    p.add_argument("--rotate-heads", action=argparse.BooleanOptionalAction, default=False,
                   help="with the rotation, also rotate each attention head's values by a Hadamard matrix folded "
                        "into v_proj and o_proj (exact in float; spreads outlier value channels over the head, "
                        "for the value cache and o_proj); default off")
    p.add_argument("--lm-head", choices=("int8", "int4"), default=None,
                   help="quantized precisions: the lm_head's weights, int8 per output channel or int4 in blocks like "
                        "the projections (half the bytes); default int4 at w4a16, int8 at w8a16")
    p.add_argument("--kv-cache", choices=("uint8", "uint16"), default="uint8",
                   help="quantized precisions: the KV cache's dtype (uint8, the default; uint16 doubles its bytes)")
    p.add_argument("--residual", choices=("fp16", "uint16"), default="fp16",
                   help="precision of the residual stream between the decoder layers: fp16 (default; float32 "
                        "on the host) or uint16 per tensor like the other activations (coarse: its range is set "
                        "by the attention-sink token's massive activations)")
    p.add_argument("--eval-tokens", type=int, default=2048,
                   help="held-out tokens scored against the float model for report.json (0 skips; default 2048)")
    p.add_argument("--eval-window", type=int, default=1024, help="window of the accuracy report (capped at CL)")
    p.add_argument("--fidelity-prompts", type=int, default=8,
                   help="report.json: generation fidelity over the first N prompts of the shipped code tasks and chat "
                        "prompts, greedy, bundle against the float model (0 skips; default 8: 4 code tasks and 4 chat prompts; "
                        "`evaluate --fidelity` runs all 121)")
    p.add_argument("--fidelity-tokens", type=int, default=128, help="report.json: new tokens per fidelity continuation at most (default 128)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export ``args.model`` to ``args.out``; prints the bundle folder."""
    from qwen_ondevice.export.options import ExportOptions
    from qwen_ondevice.export.pipeline import export

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
        int8_projections="" if args.int8_projections == "none" else args.int8_projections,
        weight_block_size=args.weight_block_size or None,
        smooth_alpha=args.smooth_alpha,
        down_proj_headroom=args.down_proj_headroom,
        kv_equalize=args.kv_equalize,
        key_center=args.key_center,
        residual=args.residual,
        kv_cache=args.kv_cache,
        lm_head=args.lm_head,
        verify_tokens=args.verify_tokens,
        rotate=args.rotate,
        rotate_heads=args.rotate_heads,
        eval_tokens=args.eval_tokens,
        eval_window=args.eval_window,
        fidelity_prompts=args.fidelity_prompts,
        fidelity_tokens=args.fidelity_tokens,
        chipset=args.chipset,
        htp_optimization=args.htp_optimization,
        keep_intermediates=args.keep_intermediates,
    )
    t0 = time.perf_counter()
    out = export(options, args.out, force=args.force)
    log(f"exported {options.model} to {out} in {time.perf_counter() - t0:.1f} s")
    print(out)
    return 0
