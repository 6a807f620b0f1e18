"""ONNX Runtime's QNN execution provider: registering the plugin, and the session options every
compile, simulator run and ``qnn-htp`` session uses."""

from __future__ import annotations

import os
import platform

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.qnn.chipsets import Chipset

#: QNN EP provider option: block-wise int4 weights (``DequantizeLinear`` with ``block_size``) go to
#: the HTP's native LPBQ kernel (QNN_QUANTIZATION_ENCODING_BLOCKWISE_EXPANSION, uint16 activations)
#: instead of the compatibility path, which dequantizes the activations to fp16 around the MatMul
#: (onnxruntime-qnn PRs #307 and #476). The conversion is exact for scales on the LPBQ grid
#: (:func:`qwen_ondevice.quantize.weight_quant.lpbq_scales`), and unlike the fp16 path its preparation is
#: deterministic, which ``verify`` on x86_64 relies on. Per-channel weights are not affected.
BLOCK_QUANT_OPTION = {"enable_block_quant_weight_optimization": "1"}
#: QNN EP provider option ``htp_graph_finalization_optimization_mode``: 1 prepares fastest with a
#: less optimized graph, 2 more optimized, 3 the most optimized and the slowest to prepare (the
#: level ONNX Runtime's own weight-sharing context example uses; onnxruntime-qnn docs). Shipped
#: bundles use 3; ``export --htp-optimization 1`` gives a faster development build. The level
#: changes the .bin, so re-preparing a part (verify, qnn-htp on x86_64) uses the bundle's own.
HTP_OPTIMIZATION_LEVELS = (1, 2, 3)
DEFAULT_HTP_OPTIMIZATION = 3
def qnn_session_options(chip: Chipset, config: dict[str, str] | None = None, log_severity: int = 3,
                        optimization: int = DEFAULT_HTP_OPTIMIZATION):
    """SessionOptions with the QNN EP (HTP backend) for ``chip``, no CPU fallback, and the HTP
    graph finalization ``optimization`` level (:data:`HTP_OPTIMIZATION_LEVELS`)."""
    import onnxruntime as ort
    import onnxruntime_qnn

    devices = qnn_devices()
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    so.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(chip.soc_model),
                                          "htp_arch": str(chip.arch),
                                          # float tensors (the residual stream) in fp16: the documented default, stated
                                          "enable_htp_fp16_precision": "1", **BLOCK_QUANT_OPTION,
                                          "htp_graph_finalization_optimization_mode": str(int(optimization))})
    return so


_REGISTERED = False


def qnn_devices():
    """Register the onnxruntime-qnn plugin EP once and return its devices."""
    global _REGISTERED
    import onnxruntime as ort
    import onnxruntime_qnn

    if not _REGISTERED:
        try:
            ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        except Exception as e:  # already registered by someone else in this process
            if "already" not in str(e).lower():
                raise
        _REGISTERED = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise UserError("onnxruntime-qnn is installed but offers no QNNExecutionProvider device")
    return devices


def simulator_host() -> bool:
    """True where the HTP is the x86_64 simulator of the onnxruntime-qnn wheel
    (``QWEN_ONDEVICE_QNN_SESSIONS=reprepare|context`` overrides)."""
    mode = os.environ.get("QWEN_ONDEVICE_QNN_SESSIONS", "").lower()
    if mode in ("reprepare", "context"):
        return mode == "reprepare"

    return platform.machine().lower() in ("x86_64", "amd64")
