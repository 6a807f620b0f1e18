"""QNN context binaries for the Snapdragon NPU (docs/bundle-format.md): the ``qnn`` export stage.

For each part of a quantized bundle, its AR-128 and AR-1 QDQ graphs are compiled by ONNX
Runtime's QNN execution provider into **one** weight-shared context binary,
``qnn/<chipset>/part_i_of_N.bin``, with one EPContext wrapper model per AR beside it
(``part_i_of_N.ar128.ctx.onnx``, ``part_i_of_N.ar1.ctx.onnx``), both pointing at that .bin.

Each part compiles in a child process (the QNN libraries can abort a process on the way out; a
child also gives an honest peak RSS per part). CPU fallback is disabled while compiling, so an op
the HTP cannot take fails the compile, and the produced wrappers are checked again: every compute
node must sit inside the EPContext node, and the .bin must hold the part's weights about once
(weight sharing), not once per graph.

Preparing a part's graphs into one context (shared with opening a bundle for a runtime session)
lives in :mod:`qwen_ondevice.qnn.prepare`, opening a shipped part in :mod:`qwen_ondevice.qnn.context`,
and what ``inspect`` reads from the files in :mod:`qwen_ondevice.qnn.describe`.

Each finished part is stamped in the export state (``qnn:<chipset>:O<level>:<part>``); a re-run resumes
after the last compiled part. The stage also writes the Genie files (:mod:`qwen_ondevice.qnn.genie`).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from qwen_ondevice.core.export_layout import PART, QNN, qnn_key, stage_key, work_dir
from qwen_ondevice.core.progress import log
from qwen_ondevice.qnn.child import leave, read_spec, run_child
from qwen_ondevice.qnn.chipsets import CHIPSETS, Chipset, check_chipset_option
from qwen_ondevice.qnn.context_binary import read_context_binary
from qwen_ondevice.qnn.ep_options import DEFAULT_HTP_OPTIMIZATION
from qwen_ondevice.qnn.genie import write_genie_files
from qwen_ondevice.qnn.graph_names import parse_graph_name
from qwen_ondevice.qnn.prepare import (
    QNN_DIR,
    CompileError,
    PrepareError,
    bin_name,
    name_graphs,
    prepare_part,
    wrapper_name,
)

#: A part's .bin may exceed its weight bytes by this factor (graph metadata, small tensors,
#: alignment); one copy per graph would be about 2x.
MAX_BIN_TO_WEIGHT_RATIO = 1.5
#: ... plus this many bytes of graph descriptions, which do not scale with the weights (they
#: dominate a part of a tiny test model, whose weights are a few kilobytes).
BIN_OVERHEAD_BYTES = 1 << 20
#: Ops allowed outside the EPContext node, and only at the graph's own inputs/outputs.
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear")


def _compile_worker() -> None:
    """Child process: compile one part's graphs into one shared context (spec JSON on stdin),
    write the result JSON to ``spec['result']`` and leave with ``os._exit`` (skipping the QNN
    libraries' exit-time destructors)."""
    spec = read_spec()
    try:
        sessions = prepare_part(spec["graphs"], CHIPSETS[spec["chipset"]], spec.get("share", True),
                                spec.get("optimization", DEFAULT_HTP_OPTIMIZATION))
        del sessions
        result = {"ok": True}
    except PrepareError as e:
        result = {"ok": False, "failed_ar": e.ar, "error": str(e)}
    except BaseException as e:  # report everything to the parent
        result = {"ok": False, "failed_ar": None, "error": f"{type(e).__name__}: {e}"}
    result["peak_rss_bytes"] = _own_peak_rss()
    Path(spec["result"]).write_text(json.dumps(result))
    leave()


def _own_peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM). ``ru_maxrss`` of a child would also count
    the parent's pages at fork time (Linux keeps it across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compile_in_child(spec: dict) -> tuple[dict, int, str]:
    """Compile graphs in a child process (:func:`_compile_worker`): ``spec`` holds ``chipset``
    (a :data:`CHIPSETS` name), ``graphs`` (``[[ar, source onnx, wrapper path], ...]``) and
    optionally ``share`` (default True: one weight-shared context) and ``optimization`` (the HTP
    level). Returns (result ``{"ok", "failed_ar", "error"}``, the child's peak RSS bytes, its stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        out: list[str] = []
        run = run_child("qwen_ondevice.qnn.compile:_compile_worker", spec, on_line=out.append, stderr_chars=None)
        stderr = "\n".join(out + [run.stderr])
        rpath = Path(spec["result"])
        if not rpath.exists():
            return {"ok": False, "failed_ar": None, "error": f"the compiler process died (exit status {run.status})"}, 0, stderr
        result = json.loads(rpath.read_text())
        return result, int(result.get("peak_rss_bytes", 0)), stderr


def _qnn_messages(stderr: str, limit: int = 4) -> str:
    """The error lines ONNX Runtime / QNN printed (ANSI colours removed)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in stderr.splitlines()]
    errs = [l for l in lines if "[E:" in l or "error" in l.lower()]
    errs = [re.sub(r"^\d{4}-\d\d-\d\d [\d:.]+ \[E:onnxruntime:[^\]]*\]\s*", "", l) for l in errs]
    return " | ".join(dict.fromkeys(errs[:limit]))


# ---------------------------------------------------------------------------------------------
# One part


def compile_part(root: Path, part: dict, chip: Chipset, work: Path, context_length: int | None = None,
                 num_parts: int | None = None, optimization: int = DEFAULT_HTP_OPTIMIZATION) -> dict:
    """Compile ``part`` (its manifest entry; graph files relative to ``root``) for ``chip`` into
    ``root/qnn/<chipset>/``; returns the part's entry for the manifest's ``qnn`` section.

    With ``context_length`` and ``num_parts`` the graphs inside the .bin are renamed to AI Hub's
    names (:func:`qwen_ondevice.qnn.graph_names.graph_name`), the wrappers pointed at them, and the .bin
    read back with QNN (:func:`check_part_binary`).

    Raises:
        CompileError: QNN could not prepare a graph (named by part and AR, with QNN's message),
            an op fell outside the EPContext node, the .bin holds the weights twice, or what QNN
            reads back from it disagrees with the part's graphs.
    """
    name = part["name"]
    ars = sorted((int(a) for a in part["graphs"]), reverse=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    graphs = [[ar, str(root / part["graphs"][str(ar)]["file"]), str(work / wrapper_name(name, ar))] for ar in ars]
    log(f"[qnn] {name}: compiling AR-{', AR-'.join(map(str, ars))} into one context for {chip.name} (soc {chip.soc_model}, {chip.dsp_arch})")
    t0 = time.perf_counter()
    result, peak, stderr = compile_in_child({"chipset": chip.name, "graphs": graphs, "optimization": optimization})
    seconds = round(time.perf_counter() - t0, 2)
    if not result["ok"]:
        where = f"AR-{result['failed_ar']} graph" if result.get("failed_ar") is not None else "graphs"
        qnn = _qnn_messages(stderr)
        raise CompileError(
            f"{name} {where}: QNN could not prepare it for {chip.name}: {result['error'].splitlines()[0][:400]}"
            + (f" [QNN: {qnn[:600]}]" if qnn else "")
        )
    bins = sorted(work.glob("*.bin"))
    if len(bins) != 1:
        raise CompileError(f"{name}: expected one shared context binary, QNN wrote {len(bins)}: {[b.name for b in bins]}")
    final_dir = root / QNN_DIR / chip.name
    final_dir.mkdir(parents=True, exist_ok=True)
    final_bin = bin_name(name)
    entry_graphs = {}
    for ar, src, wrapper in graphs:
        info = _check_wrapper(Path(wrapper), Path(src), bins[0].name, final_bin, name, ar)
        info["wrapper"] = f"{QNN_DIR}/{chip.name}/{wrapper_name(name, ar)}"
        entry_graphs[str(ar)] = info
    bin_bytes = bins[0].stat().st_size
    for ar, info in entry_graphs.items():
        if not _contains(bins[0], info["qnn_graph"].encode()):
            raise CompileError(f"{name} AR-{ar}: graph {info['qnn_graph']} is not inside {bins[0].name}")
    weight_bytes = int(part["weight_bytes"])
    ratio = bin_bytes / max(weight_bytes, 1)
    if len(graphs) > 1 and bin_bytes > MAX_BIN_TO_WEIGHT_RATIO * weight_bytes + BIN_OVERHEAD_BYTES:
        raise CompileError(
            f"{name}: the context binary is {bin_bytes / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB of weights "
            f"({ratio:.2f}x): the {len(graphs)} graphs do not share their weights"
        )
    if context_length is not None and num_parts is not None:
        name_graphs(bins[0], {int(ar): (Path(w), entry_graphs[str(ar)]) for ar, _, w in graphs}, context_length,
                    int(part["index"]), num_parts)
        check_part_binary(bins[0], part, {ar: g["qnn_graph"] for ar, g in entry_graphs.items()}, context_length, num_parts)
    for ar, _, wrapper in graphs:
        os.replace(wrapper, final_dir / wrapper_name(name, ar))
    os.replace(bins[0], final_dir / final_bin)
    shutil.rmtree(work, ignore_errors=True)
    log(f"[qnn] {name}: {final_bin} {bin_bytes / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB of weights ({ratio:.2f}x), "
        f"{seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB")
    return {
        "name": name,
        "bin": f"{QNN_DIR}/{chip.name}/{final_bin}",
        "bin_bytes": bin_bytes,
        "weight_bytes": weight_bytes,
        "bin_to_weight_ratio": round(ratio, 4),
        "graphs": entry_graphs,
        "compile_seconds": seconds,
        "peak_rss_bytes": peak,
        "htp_optimization": int(optimization),
    }


def check_part_binary(bin_path: Path, part: dict, names: dict[str, str], context_length: int, num_parts: int) -> list:
    """Read ``bin_path`` back with QNN (``QnnSystemContext_getBinaryInfo``) and check it against
    the part's manifest entry: one graph per AR under its expected name (``names``), the AR and
    CL Genie parses from that name equal to the tensor shapes, and every graph input and output
    of the ONNX graph present with its shape and (for quantized tensors) the manifest's scale and
    offset (QNN offset = -zero_point). Returns the graphs read.

    Raises:
        CompileError: naming the part and what disagrees.
    """
    where = f"{part['name']} ({bin_path.name})"
    graphs = {g.name: g for g in read_context_binary(bin_path)}
    if sorted(graphs) != sorted(names.values()):
        raise CompileError(f"{where}: QNN reads graphs {sorted(graphs)}, expected {sorted(names.values())}")
    for ar, gname in names.items():
        g = graphs[gname]
        parsed = parse_graph_name(gname)
        if parsed != (int(ar), context_length, int(part["index"]), num_parts):
            raise CompileError(f"{where}: graph name {gname!r} reads as (AR, CL, i, N) = {parsed}, expected "
                               f"({ar}, {context_length}, {part['index']}, {num_parts})")
        qnn_io = {t.name: t for t in g.inputs + g.outputs}
        for io in part["graphs"][str(ar)]["inputs"] + part["graphs"][str(ar)]["outputs"]:
            t = qnn_io.get(io["name"])
            if t is None:
                raise CompileError(f"{where}: graph {gname} has no tensor {io['name']!r} (QNN reads {sorted(qnn_io)})")
            if tuple(t.dims) != tuple(io["shape"]):
                raise CompileError(f"{where}: {io['name']} is {tuple(t.dims)} in graph {gname}, {tuple(io['shape'])} in the ONNX graph")
            enc = io.get("encoding")
            if enc is not None and not _same_encoding(t, enc):
                raise CompileError(f"{where}: {io['name']} has scale {t.scale} offset {t.offset} in graph {gname}, "
                                   f"the manifest's encoding is scale {enc['scale']} zero point {enc['zero_point']}")
        if "attention_mask" in qnn_io and qnn_io["attention_mask"].dims[-2:] != (int(ar), context_length):
            raise CompileError(f"{where}: attention_mask {qnn_io['attention_mask'].dims} disagrees with the name {gname}")
    return list(graphs.values())


def check_boundaries(parts: list[tuple[str, dict[int, tuple[Path, str]]]]) -> dict:
    """Check, from what QNN reads back from the context binaries, that the parts join as Genie
    joins them. ``parts`` lists, in part order, (part name, {AR: (.bin path, graph name)}).
    Per AR, every graph input other than the host-fed ones (:data:`HOST_INPUTS`, ``past_*``) must
    be an output of the previous part's graph of that AR with the same name, dtype, shape, scale
    and offset. Returns {AR: [boundary tensor names]}.

    Raises:
        CompileError: an unconnected boundary or one with two encodings, naming the part.
    """
    read: dict[Path, dict] = {}
    by_ar: dict[int, list] = {}
    for name, graphs in parts:
        for ar, (bin_path, gname) in graphs.items():
            if bin_path not in read:
                read[bin_path] = {g.name: g for g in read_context_binary(bin_path)}
            by_ar.setdefault(int(ar), []).append((name, read[bin_path][gname]))
    joined: dict[int, list[str]] = {}
    for ar, seq in by_ar.items():
        for k, (name, g) in enumerate(seq):
            produced = {t.name: t for t in seq[k - 1][1].outputs} if k else {}
            for t in g.inputs:
                if t.name in HOST_INPUTS or t.name.startswith("past_"):
                    continue
                src = produced.get(t.name)
                if src is None:
                    raise CompileError(f"{name} AR-{ar}: input {t.name!r} is produced by no earlier part "
                                       "(Genie would zero-fill it)")
                if (src.dtype, src.dims, src.scale, src.offset) != (t.dtype, t.dims, t.scale, t.offset):
                    raise CompileError(f"{name} AR-{ar}: boundary {t.name!r} differs between the parts: {src} / {t} "
                                       "(Genie needs one encoding for a shared tensor)")
                joined.setdefault(ar, []).append(t.name)
    return joined


#: Graph inputs the host (or Genie) feeds itself: everything else must come from another part.
HOST_INPUTS = ("input_ids", "attention_mask", "position_ids_cos", "position_ids_sin")


def _same_encoding(t, enc: dict) -> bool:
    """Whether a QNN tensor's scale/offset is the ONNX encoding ``enc`` (float32 scale)."""
    return (t.scale is not None and np.float32(t.scale) == np.float32(enc["scale"])
            and t.offset == -int(enc["zero_point"]))


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file holds ``needle`` (memory-mapped: a part's .bin can be gigabytes)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return mm.find(needle) != -1


def _check_wrapper(wrapper: Path, source: Path, old_bin: str, new_bin: str, part_name: str, ar: int) -> dict:
    """Check an EPContext wrapper, point it at ``new_bin`` and describe it.

    Every node outside an EPContext node must be a Quantize/DequantizeLinear reading a graph input
    or writing a graph output; anything else fell back to the CPU.
    """
    model = onnx.load(str(wrapper), load_external_data=False)
    g = model.graph
    src = onnx.load(str(source), load_external_data=False)
    src_nodes = len(src.graph.node)
    inputs, outputs = {i.name for i in g.input}, {o.name for o in g.output}
    ctx_nodes, outside, fell_back = [], [], []
    for n in g.node:
        if n.op_type == "EPContext":
            ctx_nodes.append(n)
            continue
        outside.append(n)
        at_boundary = n.op_type in BOUNDARY_OPS and (set(n.input) & inputs or set(n.output) & outputs)
        if not at_boundary:
            fell_back.append(f"{n.op_type} ({n.name})")
    if fell_back:
        raise CompileError(f"{part_name} AR-{ar}: {len(fell_back)} node(s) fell back to the CPU: {', '.join(fell_back[:8])}")
    if len(ctx_nodes) != 1:
        raise CompileError(f"{part_name} AR-{ar}: expected one EPContext node, found {len(ctx_nodes)}")
    node = ctx_nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    ref = attrs.get("ep_cache_context", b"").decode()
    if int(attrs.get("embed_mode", 1)) != 0 or ref != old_bin:
        raise CompileError(f"{part_name} AR-{ar}: wrapper points at {ref!r}, not the shared context binary {old_bin!r}")
    for a in node.attribute:
        if a.name == "ep_cache_context":
            a.s = new_bin.encode()
    wrapper.write_bytes(model.SerializeToString())
    return {
        "qnn_graph": attrs.get("partition_name", b"").decode(),
        "nodes": src_nodes,
        "nodes_outside": len(outside),
        "npu_fraction": round((src_nodes - len(outside)) / max(src_nodes, 1), 6),
        "qairt": attrs.get("ep_sdk_version", b"").decode(),
    }


# ---------------------------------------------------------------------------------------------
# The export stage


def compile_stage(out: Path, ckpt, options, parts, state) -> dict:
    """The export's ``qnn`` stage: compile every part (resuming after the last stamped one) and
    write the Genie files; returns the manifest sections to add (``{"qnn": ...}``, or ``{}`` when
    nothing is compiled: ``--chipset none`` or a float precision)."""
    chip = check_chipset_option(options.chipset, options.precision)
    if chip is None:
        log("[qnn] --chipset none: no context binaries compiled")
        return {}
    if options.precision not in ("w8a16", "w4a16"):
        log(f"[qnn] note: {options.precision} bundles are not compiled for the NPU (the HTP runs the quantized "
            "precisions w4a16/w8a16); no context binaries")
        return {}
    entries = []
    # the binaries of this chipset at another optimization level are overwritten below
    level = qnn_key(chip.name, options.htp_optimization)
    state.forget(k for k in list(state.done) if k.startswith(qnn_key(chip.name)) and not k.startswith(level))
    for p in parts:
        stage = qnn_key(chip.name, options.htp_optimization, p.name)
        if stage in state.done:
            log(f"[qnn] {p.name}: compiled earlier, skipped")
        else:
            info = compile_part(out, state.done[stage_key(PART, p.name)], chip, work_dir(out, QNN) / p.name,
                                options.context_length, len(parts), options.htp_optimization)
            state.mark(stage, info)
        entries.append(state.done[stage])
    shutil.rmtree(work_dir(out, QNN), ignore_errors=True)
    check_boundaries([(p["name"], {int(ar): (out / p["bin"], g["qnn_graph"]) for ar, g in p["graphs"].items()})
                      for p in entries])
    qnn = {**chip.to_dict(), "folder": f"{QNN_DIR}/{chip.name}", "weight_sharing": True,
           "htp_optimization": options.htp_optimization,
           "qairt": next(iter(entries[0]["graphs"].values())).get("qairt", ""), "parts": entries}
    # the same values write_manifest records (model.config, context_length) plus this section
    write_genie_files(out, {"model": {"config": ckpt.config.to_dict()}, "context_length": options.context_length, "qnn": qnn})
    return {"qnn": qnn}
