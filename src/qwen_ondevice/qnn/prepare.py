"""Preparing one part's QDQ graphs into one weight-shared QNN context, and naming what it holds.

The step both the export's compile stage (:mod:`qwen_ondevice.qnn.compile`) and opening a shipped
part on the x86_64 simulator (:mod:`qwen_ondevice.qnn.context`) take: ONNX Runtime's QNN EP
prepares each AR graph of a part, in order, into one context binary with an EPContext wrapper per
AR; the graphs inside are then renamed to AI Hub's names (:mod:`qwen_ondevice.qnn.graph_names`).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.qnn.chipsets import Chipset
from qwen_ondevice.qnn.ep_options import DEFAULT_HTP_OPTIMIZATION, qnn_session_options
from qwen_ondevice.qnn.graph_names import RenameError, graph_name, padded_name, rename_graph, set_partition_name

QNN_DIR = "qnn"


class CompileError(UserError):
    """A part could not be compiled for the NPU, or its binary failed a check (one-line message)."""


class PrepareError(RuntimeError):
    """QNN could not prepare the AR-``ar`` graph (the message is ONNX Runtime's / QNN's)."""

    def __init__(self, ar: int, message: str):
        super().__init__(message)
        self.ar = ar


def prepare_part(graphs: list, chip: Chipset, share: bool = True,
                 optimization: int = DEFAULT_HTP_OPTIMIZATION) -> dict[int, object]:
    """Compile one part's graphs into one weight-shared context: ``graphs`` is
    ``[[ar, source onnx, wrapper path], ...]`` in compile order; the wrappers and one .bin are
    written beside the wrappers. Returns the sessions by AR: they run the prepared graphs (on the
    HTP, or on the simulator on x86_64). Without ``share`` each graph gets a context binary of
    its own, not weight-shared (what the x86_64 simulator and Genie on it can load).

    Raises:
        PrepareError: a graph failed to prepare (an op the HTP cannot take, a QNN error).
    """
    import onnxruntime as ort

    sessions = {}
    for i, (ar, src, wrapper) in enumerate(graphs):
        cfg = {"ep.context_enable": "1", "ep.context_embed_mode": "0", "ep.context_file_path": str(wrapper)}
        if share:
            cfg["ep.share_ep_contexts"] = "1"
            if i == len(graphs) - 1:
                cfg["ep.stop_share_ep_contexts"] = "1"
        try:
            sessions[int(ar)] = ort.InferenceSession(str(src), sess_options=qnn_session_options(chip, cfg, optimization=optimization))
        except Exception as e:
            raise PrepareError(int(ar), f"{type(e).__name__}: {e}") from e
    return sessions


def wrapper_name(part_name: str, ar: int) -> str:
    return f"{part_name}.ar{ar}.ctx.onnx"


def bin_name(part_name: str) -> str:
    return f"{part_name}.bin"


def partition_name(wrapper: Path) -> str:
    """The QNN graph name an EPContext wrapper model runs (its EPContext node's ``partition_name``)."""
    node = next(n for n in onnx.load(str(wrapper), load_external_data=False).graph.node if n.op_type == "EPContext")
    return next(onnx.helper.get_attribute_value(a).decode() for a in node.attribute if a.name == "partition_name")


def name_graphs(bin_path: Path, graphs: dict[int, tuple[Path, dict]], context_length: int, index: int,
                num_parts: int) -> None:
    """Rename each AR's graph inside ``bin_path`` to its AI Hub name (padded to the length of
    ONNX Runtime's name) and point its EPContext wrapper at it; ``graphs`` maps AR to (wrapper,
    its manifest entry, whose ``qnn_graph`` is updated).

    Raises:
        CompileError: a name does not fit or is not found (see :mod:`qwen_ondevice.qnn.graph_names`).
    """
    for ar, (wrapper, info) in graphs.items():
        old = info["qnn_graph"]
        try:
            new = padded_name(graph_name(ar, context_length, index, num_parts), len(old))
            rename_graph(bin_path, old, new)
            set_partition_name(wrapper, old, new)
        except RenameError as e:
            raise CompileError(f"part {index} of {num_parts} AR-{ar}: {e}") from None
        info["qnn_graph"] = new

