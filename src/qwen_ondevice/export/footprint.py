"""Before an export starts: the peak memory and the disk space its plan needs, and the refusal
when this machine has less.

The estimate is derived from the model's shapes and the export's options, stage by stage, from
what each stage holds at its peak (see :func:`estimate_footprint`); only the QNN compile is
modelled by a ratio measured on the demo model (:data:`COMPILE_BYTES_PER_PARAM`), because the
compiler is not ours. ``benchmarks/bench_export.py`` prints the estimate beside the measured
peaks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.parts import PartSpec
from qwen_ondevice.export.plan import layer_bytes, part_bytes
from qwen_ondevice.runtime.backends.host_graph import host_float_budget

F32 = 4
#: Python with torch, onnxruntime, onnx and tokenizers imported, before any model work.
BASE_BYTES = 600 << 20
#: Peak RSS of the QNN compiler child per parameter of the part it prepares (both AR graphs, weight
#: sharing on): measured 8.8 bytes on the demo's 494M-parameter part 2 at optimization level 3
#: (docs/device.md "QNN context binaries"); rounded up.
COMPILE_BYTES_PER_PARAM = 10
#: Column-block temporaries of the weight quantizer (weight_quant.COLUMN_BLOCK_ELEMENTS floats,
#: about four alive at once).
QUANT_BLOCK_BYTES = 4 * (1 << 25) * F32


@dataclass
class Footprint:
    """Estimated peak RSS (bytes) per stage kind, and the peak bytes on disk in the bundle
    folder while the export runs (float intermediates of one part included)."""

    stages: dict[str, int] = field(default_factory=dict)
    disk_bytes: int = 0

    @property
    def peak_rss_bytes(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def describe(self) -> str:
        rows = "\n".join(f"  {k:<28} {v / 1e9:6.2f} GB" for k, v in self.stages.items())
        return (f"estimated peak RSS {self.peak_rss_bytes / 1e9:.1f} GB ({self.peak_stage}), "
                f"disk {self.disk_bytes / 1e9:.1f} GB:\n{rows}")


def _params(cfg: ModelConfig, part: PartSpec) -> int:
    return part_bytes(cfg, "fp32", part) // F32


def _layer_hessian_bytes(cfg: ModelConfig) -> int:
    """GPTQ Hessians of one decoder layer: one per MatMul input, (K, K) float32 each: the q/k/v
    input and the o_proj input (H), the gate/up input (H), the down_proj input (FFN)."""
    H, F = cfg.hidden_size, cfg.intermediate_size
    attn = cfg.num_attention_heads * cfg.head_dim
    return (H * H + attn * attn + H * H + F * F) * F32


def fidelity_reference_fits(cfg: ModelConfig, available_bytes: int) -> bool:
    """Whether the report's generation-fidelity slice runs: it decodes with the whole float model
    in memory (torch, float32: 4 bytes per parameter), and runs only when that is at most half of
    ``available_bytes`` (Qwen2-7B: 30 GB, so not on a 24 GB machine)."""
    return cfg.parameter_count() * F32 <= available_bytes / 2


def estimate_footprint(cfg: ModelConfig, parts: list[PartSpec], *, precision: str, prompt_length: int,
                       context_length: int, calibration_tokens: int, eval_tokens: int, eval_window: int,
                       compile: bool, gptq: bool = True, quantized: bool = True, fidelity_prompts: int = 0,
                       memory_bytes: int | None = None) -> Footprint:
    """Estimate an export's peak memory per stage and its peak disk use (``quantized`` False: a
    float export, which has no calibration, quantization or float intermediates).

    What each stage holds at its peak (F = float32 bytes; V vocab, H hidden, AR, CL as exported):
    - ``float graphs``: the largest weight converted to float32 and transposed (two float32
      copies) plus its stored copy in the memory map;
    - ``calibration``: one decoder layer's float32 weights in ONNX Runtime, that layer's GPTQ
      Hessians, every calibration chunk's hidden states twice (N x H x F each), one layer's
      float KV cache and the attention scores of a chunk; or the head: lm_head in float32 and
      a chunk's logits;
    - ``quantization``: the part's quantized weights (1 byte per parameter) plus, for the largest
      weight, its float32 copy three times (weight, GPTQ working copy, result), the Hessian and
      two K x K factors, or the column-block temporaries of lm_head/embedding;
    - ``compile``: :data:`COMPILE_BYTES_PER_PARAM` per parameter of the largest part;
    - ``report``: the bundle's weights in ONNX Runtime with the float copies of its int8 weights
      (a quantized bundle: twice the host float budget of ``runtime/backends/host_graph.py``, as
      ONNX Runtime prepacks each copy), and either one float32 layer of the streamed reference
      with four (window x V) float32 arrays (both logits, both log-softmaxes) or, when the
      generation-fidelity slice runs (``fidelity_prompts`` and :func:`fidelity_reference_fits`
      of ``memory_bytes``, default :func:`machine_memory_bytes`), the whole float32 model.
    Disk: the finished bundle (ONNX weights, plus as much again in context binaries when
    compiling), plus one part's float32 graphs and its Hessians while it is quantized.
    """
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    KVH, D = cfg.num_key_value_heads, cfg.head_dim
    AR, CL = prompt_length, context_length
    layer_f32 = layer_bytes(cfg, "fp32")
    hess = _layer_hessian_bytes(cfg) if gptq else 0
    tokens = min(calibration_tokens, max(AR, calibration_tokens // AR * AR))
    fp = Footprint()
    biggest = max(V * H, F * H)
    fp.stages["float graphs"] = BASE_BYTES + biggest * (2 * F32 + 2)
    scores = cfg.num_attention_heads * AR * CL * F32 * 3
    layer_calib = layer_f32 + hess + 2 * tokens * H * F32 + 2 * KVH * D * CL * F32 + scores + 3 * AR * F * F32
    head_calib = V * H * F32 + 2 * AR * V * F32 + 2 * tokens * H * F32
    if quantized:
        fp.stages["calibration"] = BASE_BYTES + max(layer_calib, head_calib)
    quant = 0
    for p in parts:
        held = _params(cfg, p)  # int8 storage of every quantized weight of the part
        if p.embedding:
            work = V * H * (2 + 1) + QUANT_BLOCK_BYTES
        else:
            # a projection: its float32 weight, GPTQ's working copy and result; the Hessian's
            # pages and the two K x K arrays of its factor (hessian_factor)
            work = 3 * F * H * F32 + (3 * F * F * F32 if gptq else 0)
            if p.head:  # lm_head: its float32 weight, its int8 result, the column-block temporaries
                work = max(work, V * H * (F32 + 1) + QUANT_BLOCK_BYTES)
        quant = max(quant, held + work)
    if quantized:
        fp.stages["quantization"] = BASE_BYTES + quant
    if compile:
        fp.stages["compile"] = BASE_BYTES + max(_params(cfg, p) for p in parts) * COMPILE_BYTES_PER_PARAM
    bundle_weights = sum(part_bytes(cfg, precision, p) for p in parts)
    if eval_tokens > 0:
        W = min(eval_window, CL)
        scoring = layer_f32 + 4 * W * V * F32
        memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
        fidelity = cfg.parameter_count() * F32 if fidelity_prompts > 0 and fidelity_reference_fits(cfg, memory_bytes) else 0
        host_copies = 2 * host_float_budget() if quantized else 0
        fp.stages["report"] = BASE_BYTES + bundle_weights + host_copies + max(scoring, fidelity)
    largest_f32 = max(part_bytes(cfg, "fp32", p) for p in parts)
    largest_layers = max(len(p.layers) for p in parts)
    fp.disk_bytes = bundle_weights * (2 if compile else 1) + (largest_f32 + largest_layers * hess if quantized else 0)
    return fp


def machine_memory_bytes() -> int:
    """Memory this export may use: what the OS reports available now (page cache counts as
    free) plus this process's own resident set."""
    return psutil.virtual_memory().available + psutil.Process().memory_info().rss


def check_fits(fp: Footprint, out: Path, cfg: ModelConfig, parts: list[PartSpec], memory_bytes: int | None = None,
               free_disk_bytes: int | None = None) -> None:
    """Refuse an export this machine cannot hold, naming what would fit.

    Raises:
        UserError: the estimated peak RSS exceeds ``memory_bytes`` (default
            :func:`machine_memory_bytes`), or the disk estimate exceeds the free space of the
            folder ``out`` is on (plus what ``out`` holds already, for a resume).
    """
    memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
    if fp.peak_rss_bytes > memory_bytes:
        hint = _memory_hint(fp, cfg, parts, memory_bytes)
        raise UserError(f"this export needs about {fp.peak_rss_bytes / 1e9:.1f} GB of memory at its peak ({fp.peak_stage}); "
                        f"this machine has {memory_bytes / 1e9:.1f} GB available: {hint}")
    if free_disk_bytes is None:
        probe = out
        while not probe.exists():
            probe = probe.parent
        free_disk_bytes = shutil.disk_usage(probe).free
        if out.exists():
            free_disk_bytes += sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if fp.disk_bytes > free_disk_bytes:
        raise UserError(f"this export needs about {fp.disk_bytes / 1e9:.1f} GB of disk in {out}; "
                        f"{free_disk_bytes / 1e9:.1f} GB is free there: choose an --out folder on a bigger disk")


def _memory_hint(fp: Footprint, cfg: ModelConfig, parts: list[PartSpec], memory_bytes: int) -> str:
    stage = fp.peak_stage
    if stage in ("compile", "quantization"):
        return (f"split into more parts (--num-parts above {len(parts)}, or a smaller --max-part-bytes) "
                "so that each part is smaller")
    if stage == "calibration":
        return "pass fewer --calibration-tokens or a shorter --context-length"
    if stage == "report":
        return "pass a smaller --eval-window, or --eval-tokens 0 and run `evaluate` on a bigger machine"
    return f"the largest weight alone ({max(cfg.vocab_size, cfg.intermediate_size) * cfg.hidden_size * 4 / 1e9:.1f} GB in float32) does not fit"
