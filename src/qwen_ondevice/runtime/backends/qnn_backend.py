"""The ``qnn-htp`` backend: a bundle's QNN context binaries through ONNX Runtime's QNN EP.

On a Snapdragon host (Windows on Snapdragon, Android/Linux ARM64 with onnxruntime-qnn) the graphs
run on the NPU; on x86_64 Linux the onnxruntime-qnn wheel runs them on the HTP *simulator*, which
is slow (well under 1 GFLOP/s): fine for short checks and a few tokens, not for chats.

It is the ``ort-cpu`` backend with other sessions: the same host-side quantize/dequantize of the
graph inputs and outputs with the manifest's encodings, the same KV-cache handling; only each
part's sessions run its context binary through the QNN EP with CPU fallback disabled
(:func:`qwen_ondevice.qnn.context.open_part_context`): on a Snapdragon host from the EPContext
wrappers (``qnn/<chipset>/part_i_of_N.ar<AR>.ctx.onnx``, the AR-128 and AR-1 sessions sharing
one loaded context); on x86_64, whose simulator crashes on weight-shared binaries, by preparing
the part again (the part's compile time, when it is first used) and checking the result has the
size (to 10%) and number of QNN graphs of the shipped .bin (``verify`` checks the bytes, one part per process).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.qnn.chipsets import CHIPSETS, check_chipset_option
from qwen_ondevice.qnn.context import open_part_context
from qwen_ondevice.runtime.backends.ort_backend import DTYPES, OrtBackend


def qnn_section(manifest, chipset: str | None = None) -> dict:
    """The manifest's ``qnn`` section (for ``chipset`` when given).

    Raises:
        UserError: the bundle has no context binaries, or none for ``chipset``.
    """
    qnn = manifest.data.get("qnn")
    if not qnn:
        raise UserError(f"{manifest.root}: the bundle has no QNN context binaries; export a quantized bundle with --chipset NAME")
    if chipset is not None and chipset != qnn["chipset"]:
        raise UserError(f"{manifest.root}: the bundle has context binaries for {qnn['chipset']} only, not {chipset}")
    return qnn


class QnnBackend(OrtBackend):
    """Runs each part's EPContext wrapper for the call's AR through the QNN execution provider."""

    name = "qnn-htp"

    def __init__(self, manifest, chipset: str | None = None):
        qnn = qnn_section(manifest, chipset)
        check_chipset_option(qnn["chipset"], manifest.precision)
        super().__init__(manifest)
        self.trim_past = False  # context binaries have the static shapes of the device graphs
        self.qnn = qnn
        self.chip = CHIPSETS[qnn["chipset"]]
        self.how = ""  # how the context binaries run here (set when the first part is opened)

    def session(self, part_index: int, ar: int):
        key = (part_index, ar)
        if key not in self._sessions:
            part = self.manifest.parts[part_index]
            qpart = self.qnn["parts"][part_index]
            sha = self.manifest.data["files"].get(qpart["bin"], {}).get("sha256")
            with tempfile.TemporaryDirectory(prefix="qnn-htp-") as tmp:
                sessions, self.how = open_part_context(self.manifest.root, part, qpart, self.chip, sha, Path(tmp) / "part",
                                                       strict=False)
            for a, sess in sessions.items():
                self._sessions[(part_index, a)] = sess
                self._input_types[(part_index, a)] = {i["name"]: DTYPES[i["dtype"]] for i in part["graphs"][str(a)]["inputs"]}
        return self._sessions[key]
