"""Opening a shipped part's context binary for a runtime session (the ``qnn-htp`` backend, ``verify``).

On a Snapdragon host the part's EPContext wrappers load the .bin directly. The x86_64 simulator
of onnxruntime-qnn cannot load a weight-shared binary, so there the part's QDQ graphs are prepared
again exactly as the export did and the fresh binary is compared with the shipped one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from qwen_ondevice.core.files import sha256_file
from qwen_ondevice.qnn.chipsets import Chipset
from qwen_ondevice.qnn.context_binary import read_context_binary
from qwen_ondevice.qnn.ep_options import DEFAULT_HTP_OPTIMIZATION, qnn_session_options, simulator_host
from qwen_ondevice.qnn.prepare import (
    CompileError,
    PrepareError,
    name_graphs,
    partition_name,
    prepare_part,
    wrapper_name,
)

#: The share of a context binary's size allowed to differ between the shipped binary and a fresh
#: preparation of the same graphs (open_part_context): QNN's preparation varies by a few hundred
#: bytes of graph description, by a page in size on the demo, and on a tiny part with an int4
#: lm_head of 151936 output channels by up to 4.8% (measured differences: docs/bundle-format.md);
#: what QNN reads back (graphs, inputs, outputs, encodings) must be equal all the same.
MAX_DIFFERING_FRACTION = 0.1


#: The size difference allowed whatever the binary's size: 32 4 KiB pages (a tiny test bundle's
#: 256 KiB part differs by a page between preparations now and then).
MIN_ALLOWED_DIFFERENCE = 32 * 4096


def allowed_difference(size: int) -> float:
    """Bytes of size a fresh preparation of a ``size``-byte context binary may differ from the
    shipped one by: :data:`MAX_DIFFERING_FRACTION` of it, at
    least :data:`MIN_ALLOWED_DIFFERENCE`."""
    return max(MAX_DIFFERING_FRACTION * size, MIN_ALLOWED_DIFFERENCE)


def differing_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> int:
    """The number of byte positions at which two files of one size differ."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x:
                return n
            n += int(np.count_nonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8)))


def open_part_context(root: Path, part: dict, qnn_part: dict, chip: Chipset, bin_sha256: str | None, work: Path,
                      strict: bool = True, context_length: int | None = None, num_parts: int | None = None):
    """Sessions by AR that run one part's context binary on the HTP; returns (sessions, how).

    On a Snapdragon host the EPContext wrappers are loaded (both sessions share the one loaded
    context). The x86_64 simulator of onnxruntime-qnn 2.7 crashes (SIGSEGV in context creation)
    on *any* weight-shared context binary, so there the part's QDQ graphs are prepared again
    exactly as the export did. QNN numbers tensors with a
    per-process counter: only the first part prepared in a process gives a byte-identical .bin.
    ``strict`` (use it in a fresh process, as ``verify`` does) requires the sha256 to match or,
    since QNN does not prepare every graph deterministically, a size within
    :func:`allowed_difference` of the shipped one with the same graphs, inputs, outputs and
    encodings read back by libQnnSystem (the differing bytes are only reported); otherwise the size (to that share) and the number of QNN graphs must match.
    The fresh graphs are renamed as the export renamed the shipped ones (:func:`name_graphs`,
    with ``context_length`` and ``num_parts``) before the comparison.

    Raises:
        CompileError: the fresh preparation differs from the shipped .bin (another QAIRT
            version?), or QNN fails.
    """
    optimization = int(qnn_part.get("htp_optimization", DEFAULT_HTP_OPTIMIZATION))
    if not simulator_host():
        so = lambda: qnn_session_options(chip, {"ep.share_ep_contexts": "1"}, optimization=optimization)  # noqa: E731
        import onnxruntime as ort

        return ({int(ar): ort.InferenceSession(str(root / g["wrapper"]), sess_options=so()) for ar, g in qnn_part["graphs"].items()},
                "loaded from the context binary")

    ars = sorted((int(a) for a in qnn_part["graphs"]), reverse=True)  # the export's compile order
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        graphs = [[ar, str(root / part["graphs"][str(ar)]["file"]), str(work / wrapper_name(part["name"], ar))] for ar in ars]
        try:
            sessions = prepare_part(graphs, chip, optimization=optimization)
        except PrepareError as e:
            raise CompileError(f"{part['name']} AR-{e.ar}: QNN could not prepare it for {chip.name}: {str(e).splitlines()[0][:400]}") from None
        bins = sorted(work.glob("*.bin"))
        if strict and len(bins) == 1 and context_length is not None and num_parts is not None:
            name_graphs(bins[0], {int(ar): (Path(w), {"qnn_graph": partition_name(Path(w))}) for ar, _, w in graphs},
                        context_length, int(part["index"]), num_parts)
        detail = f"{len(bins)} context binaries" if len(bins) != 1 else "a different sha256"
        if strict:
            same = len(bins) == 1 and (bin_sha256 is None or sha256_file(bins[0]) == bin_sha256)
            how = f"re-prepared on this x86_64 host, byte-identical to {Path(qnn_part['bin']).name}"
            shipped = root / qnn_part["bin"]
            if not same and len(bins) == 1 and shipped.is_file():
                # QNN's preparation of a graph that moves uint8 tensors (the KV outputs) is not
                # deterministic: two fresh preparations of one part differ in a few hundred bytes
                # of graph description, and on the demo model in size by one 4 KiB page; so the
                # size must be within allowed_difference and what QNN reads back (every graph,
                # its inputs and outputs with their encodings) equal; the differing bytes are only
                # reported, since a layout shifted by a few bytes makes every later byte differ
                size, fresh = shipped.stat().st_size, bins[0].stat().st_size
                diff = differing_bytes(bins[0], shipped) if fresh == size else None
                detail = f"{diff} of {size} bytes differ" if diff is not None else f"{fresh} bytes against {size}"
                same = abs(fresh - size) <= allowed_difference(size)
                if same:
                    same = sorted(read_context_binary(bins[0]), key=lambda g: g.name) == sorted(
                        read_context_binary(shipped), key=lambda g: g.name)
                    detail += ", the graphs and encodings QNN reads back " + ("are equal" if same else "differ")
                how = (f"re-prepared on this x86_64 host, not byte-identical to {shipped.name} (QNN's preparation "
                       f"varies between runs): {detail}")
        else:
            # the QNN graph names are ONNX Runtime partition ids, which vary between preparations
            # of the same graphs: the count is compared, not the names
            size = int(qnn_part["bin_bytes"])
            if len(bins) == 1:
                detail = f"{bins[0].stat().st_size} bytes against {size}"
            same = (len(bins) == 1 and abs(bins[0].stat().st_size - size) <= allowed_difference(size)
                    and len({partition_name(Path(g[2])) for g in graphs}) == len(qnn_part["graphs"]))
            how = f"re-prepared on this x86_64 host (the size and number of QNN graphs of {Path(qnn_part['bin']).name})"
        if not same:
            raise CompileError(
                f"{qnn_part['bin']}: preparing {part['name']} again on this host does not give the same context binary "
                f"({detail}; exported with another onnxruntime-qnn / QAIRT?); the x86_64 "
                "simulator cannot load a weight-shared binary directly, so it cannot run it here; re-export the bundle"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sessions, how

