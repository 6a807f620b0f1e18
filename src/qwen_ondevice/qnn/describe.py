"""What a compiled bundle's QNN files say, for ``inspect``: per part the .bin, the graphs its
EPContext wrappers point into, and the graphs and tensors QNN itself reads from the .bin."""

from __future__ import annotations

from pathlib import Path

import onnx

from qwen_ondevice.qnn.context_binary import QnnBinaryError, read_context_binary
from qwen_ondevice.qnn.prepare import QNN_DIR


def describe_context(root: Path, qnn: dict) -> list[dict]:
    """What the bundle's files say (for ``inspect``): per part the .bin, its size, the QNN graphs
    its wrappers point into and the fraction of nodes on the NPU, and (``binary``) the graphs QNN
    itself reads from the .bin with each graph's I/O tensors (name, QNN data type, shape,
    scale/offset), as the device sees them."""
    folder = root / QNN_DIR / qnn["chipset"]
    rows = []
    for p in qnn["parts"]:
        graphs = {}
        for ar, g in p["graphs"].items():
            model = onnx.load(str(root / g["wrapper"]), load_external_data=False)
            ctx = [n for n in model.graph.node if n.op_type == "EPContext"]
            attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in ctx]
            graphs[ar] = {
                "wrapper": g["wrapper"],
                "qnn_graphs": [a.get("partition_name", b"").decode() for a in attrs],
                "bins": sorted({a.get("ep_cache_context", b"").decode() for a in attrs}),
                "nodes_outside": len(model.graph.node) - len(ctx),
                "npu_fraction": (g["nodes"] - (len(model.graph.node) - len(ctx))) / max(g["nodes"], 1),
            }
        b = folder / Path(p["bin"]).name
        rows.append({"name": p["name"], "bin": p["bin"], "bin_bytes": b.stat().st_size if b.exists() else None,
                     "weight_bytes": p["weight_bytes"], "graphs": graphs, "binary": _read_binary(b)})
    return rows


def _read_binary(path: Path) -> list[dict] | str:
    """The graphs inside a .bin as QNN reads them (GraphInfo dicts), or why they cannot be read."""
    if not path.exists():
        return "missing"
    try:
        return [g.to_dict() for g in read_context_binary(path)]
    except QnnBinaryError as e:
        return str(e)

