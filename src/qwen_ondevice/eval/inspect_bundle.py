"""``qwen-ondevice inspect BUNDLE``: what is in a bundle, and whether its files are intact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from qwen_ondevice.core.bundle import bytes_per_token, read_manifest, verify_files
from qwen_ondevice.qnn.describe import describe_context


def op_histogram(path: Path) -> dict[str, int]:
    """Op-type counts of an ONNX graph (external data is not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: (-kv[1], kv[0])))


def quantization_scheme(manifest: dict) -> dict | None:
    """The bundle's quantization scheme from its manifest's ``quantization`` section, without the
    per-tensor detail: weights, activations, KV cache, rotation, calibration, smoothing, the count of
    int8 projection tensors and of float tensors. None for a float bundle."""
    q = manifest.get("quantization")
    if not q:
        return None
    keep = ("precision", "weights", "activations", "kv_cache", "rotation", "calibration", "smoothing")
    return {**{k: q.get(k) for k in keep},
            "int8_projection_tensors": q.get("mixed_precision", {}).get("count", 0),
            "float_tensors": sum(len(f["tensors"]) for f in q.get("float_islands", []))}


def inspect_bundle(root: Path) -> dict:
    """A report dict: parts (files, bytes, graphs with I/O and op histograms), the quantization
    scheme (:func:`quantization_scheme`), KV-cache bytes per token and at full context, weight
    bytes per generated token, and the files whose sha256 no longer matches (``bad_files``;
    empty when intact)."""
    m = read_manifest(root, verify=False)
    cfg = m.config
    parts = []
    for part in m.parts:
        graphs = {}
        for ar, g in part["graphs"].items():
            graphs[ar] = {
                "file": g["file"],
                "bytes": (root / g["file"]).stat().st_size,
                "inputs": g["inputs"],
                "outputs": g["outputs"],
                "ops": op_histogram(root / g["file"]),
            }
        parts.append({
            "name": part["name"],
            "layers": part["layers"],
            "embedding": part["embedding"],
            "head": part["head"],
            "data": part["data"],
            "data_bytes": (root / part["data"]).stat().st_size,
            "weight_bytes": part["weight_bytes"],
            "graphs": graphs,
        })
    sizes = bytes_per_token(m)
    return {
        "bundle": str(root),
        "precision": m.precision,
        "ar": m.ar_lengths,
        "context_length": m.context_length,
        "model": {"source": m.data["model"]["source"], **cfg.to_dict()},
        "quantization": quantization_scheme(m.data),
        "parts": parts,
        "weight_bytes": sizes["weight_bytes"],
        "kv_cache_bytes_per_token": sizes["kv_cache_bytes_per_token"],
        "kv_cache_bytes_full_context": sizes["kv_cache_bytes_full_context"],
        "bytes_read_per_token_full_context": sizes["bytes_per_token_full_context"],
        "bytes_per_token": sizes,
        "qnn": _qnn_report(root, m.data.get("qnn")),
        "files": len(m.data["files"]),
        "bad_files": verify_files(m),
    }


def _qnn_report(root: Path, qnn: dict | None) -> dict:
    """Per chipset: the context binaries, their sizes, the QNN graphs inside each and the fraction
    of nodes on the NPU (read from the EPContext wrappers)."""
    if not qnn:
        return {}
    return {qnn["chipset"]: {"soc_model": qnn["soc_model"], "dsp_arch": qnn["dsp_arch"],
                             "htp_optimization": qnn.get("htp_optimization"), "parts": describe_context(root, qnn)}}


def format_scheme(q: dict | None) -> list[str]:
    """Lines for :func:`quantization_scheme`'s dict (none for a float bundle)."""
    if q is None:
        return []
    w = q["weights"]
    int8 = w.get("int8_projections") or []
    rot = q.get("rotation")
    cal = q.get("calibration") or {}
    lines = [
        f"quantization {q['precision']}: projections {w['projections']} ({w.get('method')})"
        + (f", {'/'.join(int8)} int8 ({q['int8_projection_tensors']} tensors)" if int8 else "")
        + f"; lm_head {w['lm_head']}; embedding {w['embedding']}",
        "  activations " + q["activations"].replace(", see float_islands", "") + f" ({q['float_tensors']} float tensors); KV cache {q['kv_cache']}",
        "  residual stream " + (f"rotated: {rot['residual_stream']}, seed {rot['seed']}" if rot else "not rotated")
        + (f"; values rotated: {rot['heads']}" if rot and rot.get("heads") else "")
        + f"; calibration {cal.get('tokens')} tokens of {cal.get('text')}",
    ]
    if q.get("smoothing"):
        lines.append(f"  smoothing: {q['smoothing']['down_proj_input']}, alpha {q['smoothing']['alpha']:g}")
    return lines


def format_report(r: dict) -> str:
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    lines = [
        f"bundle {r['bundle']}: {r['model']['source']}, precision {r['precision']}, AR {r['ar']}, CL {r['context_length']}",
        f"weights {mb(r['weight_bytes'])} of ONNX data, {mb(r['bytes_per_token']['device_weight_bytes'])} on the device "
        f"({r['bytes_per_token']['weights_counted_from']}); KV cache {r['kv_cache_bytes_per_token']} B/token, "
        f"{mb(r['kv_cache_bytes_full_context'])} at full context",
        f"read per generated token at full context: {mb(r['bytes_per_token']['weight_bytes_read_per_token'])} of weights "
        f"(the embedding one row) + {mb(r['kv_cache_bytes_full_context'])} of KV cache = "
        f"{mb(r['bytes_read_per_token_full_context'])}",
        *format_scheme(r["quantization"]),
    ]
    for p in r["parts"]:
        what = "embedding" if p["embedding"] else f"layers {p['layers'][0]}-{p['layers'][1] - 1}" + (" + head" if p["head"] else "")
        lines.append(f"\n{p['name']} ({what}): weights {mb(p['weight_bytes'])}, {p['data']} {mb(p['data_bytes'])}")
        for ar, g in p["graphs"].items():
            lines.append(f"  AR-{ar}: {g['file']} ({g['bytes']} B)")
            for kind in ("inputs", "outputs"):
                io = g[kind]
                shown = io if len(io) <= 8 else io[:6] + [{"name": f"... {len(io) - 7} more", "shape": [], "dtype": ""}] + io[-1:]
                lines.append(f"    {kind}: " + ", ".join(f"{x['name']} {tuple(x['shape']) if x['shape'] else ''} {x['dtype']}".strip() for x in shown))
            lines.append("    ops: " + ", ".join(f"{k} {v}" for k, v in g["ops"].items()))
    for chip, q in r.get("qnn", {}).items():
        lines.append(f"\nQNN context binaries for {chip} (soc_model {q['soc_model']}, HTP {q['dsp_arch']}, "
                     f"HTP graph optimization level {q.get('htp_optimization')}):")
        for p in q["parts"]:
            lines.append(f"  {p['bin']}: {mb(p['bin_bytes'])} ({p['bin_bytes'] / max(p['weight_bytes'], 1):.2f}x the part's weights)"
                         if p["bin_bytes"] is not None else f"  {p['bin']}: missing")
            for ar, g in p["graphs"].items():
                lines.append(f"    AR-{ar}: {', '.join(g['qnn_graphs'])} in {', '.join(g['bins'])}; "
                             f"{g['npu_fraction'] * 100:.1f}% of nodes on the NPU ({g['wrapper']})")
            if isinstance(p["binary"], str):
                lines.append(f"    QNN cannot read the binary: {p['binary']}")
                continue
            for g in p["binary"]:  # what QNN itself reads from the .bin
                lines.append(f"    graph {g['name']} (read from the .bin):")
                for kind in ("inputs", "outputs"):
                    io = g[kind]
                    shown = io if len(io) <= 6 else io[:4] + io[-1:]
                    lines.append(f"      {kind}: " + ", ".join(
                        f"{t['name']} {tuple(t['dims'])} {t['dtype']}" + (f" scale {t['scale']:.4g} offset {t['offset']}" if t["scale"] is not None else "")
                        for t in shown) + (f" (+{len(io) - len(shown)} more)" if len(io) > len(shown) else ""))
    lines.append("")
    if r["bad_files"]:
        lines.append(f"INTEGRITY: {len(r['bad_files'])} of {r['files']} files fail their sha256: {', '.join(r['bad_files'])}")
    else:
        lines.append(f"integrity: all {r['files']} files match their sha256")
    return "\n".join(lines)

