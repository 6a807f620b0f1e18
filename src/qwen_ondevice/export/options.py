"""What ``export`` was asked for, and the resumable state of an export in ``BUNDLE/.export``."""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from qwen_ondevice.core.bundle import MANIFEST
from qwen_ondevice.core.checkpoint import Checkpoint
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.export_layout import MANIFEST_STAGE, REPORT_STAGE, STATE_DIR, STATE_FILE
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.layer import PROJECTIONS
from qwen_ondevice.core.progress import log
from qwen_ondevice.qnn.chipsets import check_chipset_option
from qwen_ondevice.qnn.ep_options import DEFAULT_HTP_OPTIMIZATION

PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16")
QUANTIZED = ("w8a16", "w4a16")
DEFAULT_PRECISION = "w4a16"
#: Calibration tokens (sequences of 2048, see quantize/calibrate.py). Chosen at w4a16 on both test
#: models against 4096 and 16384 (docs/numerics.md "Calibration length"): lower KL than 4096, and on
#: the off-grid model no more error growth deep into the context. GPTQ's Hessian of a projection
#: whose input has K features has rank at most the number of calibration tokens: the MLP's down_proj
#: has K = 4864 on the demo and 18944 on Qwen2-7B. 16384 lowers the KL further, but calibration runs
#: every layer over every token, and at 16384 a Qwen2-7B export would pass its 2-hour budget.
DEFAULT_CALIBRATION_TOKENS = 8192
#: w4a16 int4 block size: on the demo model, blocks of 32 lose far less perplexity and top-1
#: agreement than one scale per output channel (the measurements are in docs/numerics.md "Accuracy of the bundle"). 32 is
#: also the block of the GGUF Q4_K weights the demo comes from.
DEFAULT_WEIGHT_BLOCK_SIZE = 32
#: w4a16: projection kinds kept at int8 in every layer, paid for by an int4 lm_head. Chosen on the
#: off-grid model against all int4 with an int8 lm_head (docs/numerics.md "Ablations"): lower KL and
#: longer identical prefixes in free-running generation, at fewer bytes per Qwen2-7B token.
DEFAULT_INT8_PROJECTIONS = "v_proj,o_proj"
#: Precisions whose export folds the residual-stream rotation into the weights unless told not to
#: (``--no-rotate``). Chosen at w4a16 on both test models (docs/numerics.md "Rotation"): on the demo
#: it lowers the perplexity loss and the KL, on the off-grid model (already rotated once) it
#: changes nothing measurable; exact in float, so only export time pays for it. w8a16 keeps its
#: weights as they are: not measured there.
ROTATE_BY_DEFAULT = ("w4a16",)


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
    int8_fraction: float = 0.0  # w4a16: share of projection weights kept at int8 (docs/numerics.md "Ablations")
    # w4a16: comma-separated projection kinds kept at int8 in every layer ("" keeps every projection int4)
    int8_projections: str = DEFAULT_INT8_PROJECTIONS
    # w4a16: int4 scales per block of this many input rows, on the LPBQ grid (weight_quant.lpbq_scales);
    # None: one scale per output channel
    weight_block_size: int | None = DEFAULT_WEIGHT_BLOCK_SIZE
    smooth_alpha: float = 0.0  # SmoothQuant strength for the MLP down_proj input (0: off; quantize/smoothing.py)
    down_proj_headroom: float = 1.0  # uint16 range of the down_proj input, widened (qdq.activation_encodings)
    kv_equalize: bool = True  # per-RoPE-pair key scales folded into q_proj/k_proj before calibration (quantize/kv_equalize.py)
    key_center: bool = True  # keys stored minus their calibrated per-channel midrange (quantize/kv_equalize.py)
    # fold a random orthogonal rotation of the residual stream into the weights (quantize/rotation.py);
    # None: the precision's default, on at w4a16 (ROTATE_BY_DEFAULT), off otherwise
    rotate: bool | None = None
    # with rotate: also rotate each head's values (v_proj rows, o_proj columns) by a Hadamard matrix
    # (quantize/rotation.py head_rotation); off by default (docs/numerics.md: measured, no gain)
    rotate_heads: bool = False
    # quantized precisions: the lm_head's weights, "int8" per channel or "int4" (as the projections);
    # None: int4 at w4a16 (DEFAULT_INT8_PROJECTIONS), int8 at w8a16
    lm_head: str | None = None
    kv_cache: str = "uint8"  # quantized precisions: the KV cache's dtype, uint8 or uint16 (core.encodings.KV_CACHE_DTYPES)
    residual: str = "fp16"  # the residual stream's precision: "fp16" (float, fp16 on the HTP) or "uint16"
    eval_tokens: int = 2048  # held-out tokens scored for report.json (0 skips the accuracy report)
    eval_window: int = 1024
    # generation fidelity in report.json (eval/fidelity.py): the first N prompts of the shipped set,
    # answered greedily by the bundle and the float model, up to fidelity_tokens new tokens (0 skips)
    fidelity_prompts: int = 8
    fidelity_tokens: int = 128
    chipset: str = "snapdragon-8-elite"  # QNN context binaries for this chipset; "none" skips (qnn/compile.py)
    htp_optimization: int = DEFAULT_HTP_OPTIMIZATION  # HTP graph finalization level (qnn/compile.py): 3 ships, 1 builds fastest
    keep_intermediates: bool = False  # keep the float graphs and calibration files in BUNDLE/.export
    # speculative decoding: an AR-(k + 1) verify graph beside AR-128 and AR-1 in each part, sharing
    # their weights (runtime/speculative.py); 0: none
    verify_tokens: int = 0

    def __post_init__(self) -> None:
        if self.rotate is None:  # resolved here, so a resume compares what was done, not "default"
            self.rotate = self.precision in ROTATE_BY_DEFAULT

    @property
    def int8_projection_kinds(self) -> tuple[str, ...]:
        """The projection kinds of ``int8_projections`` (``("v_proj", "o_proj")``; () for "")."""
        return tuple(p for p in self.int8_projections.split(",") if p)

    @property
    def lm_head_precision(self) -> str:
        """``int8`` or ``int4``: the lm_head's weights as asked, else the precision's default."""
        return self.lm_head or ("int4" if self.precision == "w4a16" else "int8")

    @property
    def ar_lengths(self) -> list[int]:
        """The graphs of each part, largest AR first: the prompt processor, the verify graph
        (AR ``verify_tokens`` + 1, when asked) and the token generator (AR 1)."""
        if self.prompt_length == 1:
            return [1]
        return [self.prompt_length] + ([self.verify_tokens + 1] if self.verify_tokens else []) + [1]


#: Options that change no graph and no weight. A resume asked for other values keeps every
#: finished part and redoes only the stages they decide: the accuracy report (``eval_*``) and
#: the context binaries of the chipset at the optimization level asked (``chipset``,
#: ``htp_optimization``); binaries already compiled for another chipset stay in the bundle.
FINISHING_OPTIONS = {"eval_tokens": (REPORT_STAGE,), "eval_window": (REPORT_STAGE,), "fidelity_prompts": (REPORT_STAGE,),
                     "fidelity_tokens": (REPORT_STAGE,), "chipset": (), "htp_optimization": (),
                     "keep_intermediates": ()}


def _defaults() -> dict:
    """The options that have a default, with it."""
    return {f.name: f.default for f in fields(ExportOptions) if f.default is not MISSING}


def _graph_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in FINISHING_OPTIONS}


class ExportState:
    """The stamps of finished stages, in ``BUNDLE/.export/state.json``."""

    def __init__(self, out: Path, options: ExportOptions):
        self.path = out / STATE_DIR / STATE_FILE
        self.options = asdict(options)
        self.done: dict[str, dict] = {}
        #: after a :meth:`load` that found other graph options: (option, its value there, the value asked)
        self.differences: list[tuple[str, object, object]] = []

    def load(self) -> bool:
        """Load an earlier state; True when it exists and was made with the same graph options
        (all but :data:`FINISHING_OPTIONS`; the ones that differ are kept in ``differences``).
        Stages that a changed finishing option decides are dropped, so they run again; the
        manifest is always rewritten then."""
        if not self.path.exists():
            return False
        state = json.loads(self.path.read_text())
        # an option added since that export was started counts as its default there
        earlier = {**_defaults(), **(state.get("options") or {})}
        there, asked = _graph_options(earlier), _graph_options(self.options)
        if there != asked:
            self.differences = [(k, there.get(k), asked.get(k)) for k in sorted(set(there) | set(asked))
                                if there.get(k) != asked.get(k)]
            return False
        self.done = state.get("done", {})
        changed = [k for k in FINISHING_OPTIONS if k in earlier and earlier[k] != self.options[k]]
        if changed:
            log("resume with other " + ", ".join(f"--{k.replace('_', '-')} ({earlier[k]} -> {self.options[k]})" for k in changed)
                + ": the finished parts are kept")
            for stage in {MANIFEST_STAGE, *(s for k in changed for s in FINISHING_OPTIONS[k])}:
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
            if MANIFEST_STAGE in state.done:
                log(f"{out}: this bundle is complete with these options; nothing to redo (--force exports it again)")
            else:
                log(f"resuming the export in {out} (finished: {', '.join(state.done) or 'nothing'})")
            return state
        if state.differences:  # an unfinished or finished export of these files, asked for other options
            differ = "; ".join(f"{k.replace('_', '-')} {there!r} there, {asked!r} asked" for k, there, asked in state.differences)
            raise UserError(f"{out}: folder holds an export with other options ({differ}); ask for the same to resume it, "
                            "choose another --out, or pass --force to overwrite it")
        what = "an export with other options" if (out / STATE_DIR).exists() or (out / MANIFEST).exists() else "other files"
        raise UserError(f"{out}: folder holds {what}; choose another --out or pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    return state


def check_options(options: ExportOptions, ckpt: Checkpoint) -> None:
    """Raises UserError for an unknown precision, AR >= CL, CL beyond the checkpoint, a verify
    graph that does not fit between AR-1 and the prompt processor, an unknown projection kind
    in ``int8_projections``, or ``rotate_heads`` without ``rotate``."""
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    unknown = [p for p in options.int8_projection_kinds if p not in PROJECTIONS]
    if unknown:
        raise UserError(f"--int8-projections: unknown projection {', '.join(unknown)}; choose among {', '.join(PROJECTIONS)}")
    if options.rotate_heads and not options.rotate:
        raise UserError("--rotate-heads rotates on top of the residual-stream rotation: drop --no-rotate, or --rotate-heads")
    if options.prompt_length < 1 or options.prompt_length >= options.context_length:
        raise UserError(
            f"--prompt-length (AR) {options.prompt_length} must be at least 1 and below --context-length (CL) {options.context_length}"
        )
    if options.verify_tokens and not 1 <= options.verify_tokens < options.prompt_length - 1:
        raise UserError(f"--verify-tokens {options.verify_tokens} must be between 1 and {options.prompt_length - 2} "
                        f"(its graph is AR-{options.verify_tokens + 1}, between AR-1 and the prompt processor's "
                        f"AR-{options.prompt_length}), or 0 for no verify graph")
    if options.context_length > ckpt.config.max_position_embeddings:
        raise UserError(
            f"--context-length {options.context_length} exceeds what the checkpoint reaches "
            f"(max_position_embeddings {ckpt.config.max_position_embeddings})"
        )
    check_chipset_option(options.chipset, options.precision)
