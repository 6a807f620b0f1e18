"""The ``ort-cpu`` backend: a bundle's ONNX parts on ONNX Runtime's CPU execution provider."""

from __future__ import annotations

import numpy as np

from qwen_ondevice.core.encodings import Encoding
from qwen_ondevice.runtime.backends.host_graph import host_float_budget, host_model
from qwen_ondevice.runtime.engine import Backend, KVCache

#: Granularity (tokens) of the past fed to a call when trimming (OrtBackend.past_window): fewer
#: distinct input shapes for ONNX Runtime, at most PAST_BUCKET - 1 masked slots computed.
PAST_BUCKET = 64

DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "uint16": np.uint16, "int32": np.int32}

#: ONNX Runtime fuses ``DequantizeLinear(int4/int8 weight) -> MatMul`` into ``MatMulNBits``, whose
#: default accuracy level (4) quantizes the activations to int8 blocks inside the product: far
#: coarser than the uint16 activations of the QDQ model, so the CPU run would no longer simulate
#: the device numerics. Level 1 keeps the fused kernel but computes in fp32, like the QDQ graph.
QDQ_MATMULNBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")

#: ``exact``: the QDQ graphs' own arithmetic (the host simulation of the device numerics; what
#: ``evaluate``, the export report and ``verify`` measure). ``fast``: MatMulNBits at accuracy
#: level 4, i.e. each int4/int8 weight product quantizes its activation row to int8 blocks on the
#: fly (as llama.cpp's q8 activations do), and the int8 lm_head stays int8. Only the products change;
#: every other quantization point of the graph is kept (its accuracy and speed against ``exact``:
#: docs/benchmarks.md "Host rewrites and host numerics").
HOST_NUMERICS = ("exact", "fast")
FAST_MATMULNBITS_ACCURACY = "4"


def qdq_session_options(ort, so=None):
    """``so`` (or new SessionOptions) set to run a QDQ graph with its own arithmetic (see
    :data:`QDQ_MATMULNBITS_ACCURACY`); a level the caller already set is kept."""
    so = so or ort.SessionOptions()
    key, value = QDQ_MATMULNBITS_ACCURACY
    try:
        so.get_session_config_entry(key)
    except RuntimeError:
        so.add_session_config_entry(key, value)
    return so


class OrtBackend(Backend):
    """Runs each part's AR-N graph in order; the host owns KV cache, positions and mask.

    One ``InferenceSession`` per part and AR, created lazily (a decode-only run never loads the
    AR-128 graphs) from the graph with the host rewrites of :mod:`.host_graph`. Float inputs are
    cast (float graphs) or quantized with the manifest's encodings (QDQ graphs); logits come back
    float32. ``numerics`` is one of :data:`HOST_NUMERICS`; ``trim_past`` (on for the CPU EP) feeds
    each call only ``past_window(n_past, P)`` cache slots. Set both before the first call.
    ``float_pattern`` (a diagnostic, CPU EP only): the activations whose names match it run in
    float (:func:`.host_graph.float_activations`).

    Raises:
        ValueError: an unknown ``numerics``.
    """

    name = "ort-cpu"

    def __init__(self, manifest, providers: list | None = None, intra_op_threads: int = 0, numerics: str = "exact",
                 float_pattern: str | None = None):
        import onnxruntime as ort

        if numerics not in HOST_NUMERICS:
            raise ValueError(f"numerics {numerics!r}: choose one of {', '.join(HOST_NUMERICS)}")
        self.numerics = numerics  # HOST_NUMERICS
        self.float_pattern = float_pattern
        self.ort = ort
        self.manifest = manifest
        self.config = manifest.config
        self.context_length = manifest.context_length
        self.ar_lengths = tuple(manifest.ar_lengths)
        self.kv_dtype = DTYPES[manifest.data["kv_cache"]["dtype"]]
        self.providers = providers or ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads  # 0: ONNX Runtime's default (the physical cores)
        # feed only the filled past slots (host_graph.symbolic_past); off where the caller needs
        # the static shapes of the device graphs (verify records these feeds for the HTP)
        self.trim_past = self.providers == ["CPUExecutionProvider"]
        self.past_bucket = PAST_BUCKET
        self._sessions: dict[tuple[int, int], object] = {}
        self._input_types: dict[tuple[int, int], dict[str, np.dtype]] = {}
        self._host_arrays: dict[tuple[int, int], list] = {}  # OrtValues that must outlive their session
        self._host_names: dict[tuple[int, int], list[str]] = {}
        # shared by every session (a 7B bundle has 5 parts), with the lm_head's float32 copy, the
        # one that saves the most per token, reserved until the head part's session takes it
        self.host_float_left = host_float_budget()
        self.head_reserve = min(self.host_float_left, 4 * self.config.vocab_size * self.config.hidden_size)
        # quantized bundles: the encoding of every quantized graph input/output, by name
        self.encodings: dict[str, Encoding] = {}
        self.specs = manifest.part_specs()
        for part in manifest.parts:
            for g in part["graphs"].values():
                for io in g["inputs"] + g["outputs"]:
                    if "encoding" in io:
                        self.encodings[f"{part['name']}:{io['name']}"] = Encoding.from_dict(io["encoding"])

    def session(self, part_index: int, ar: int):
        key = (part_index, ar)
        if key not in self._sessions:
            part = self.manifest.parts[part_index]
            path = self.manifest.graph_path(part, ar)
            so = self.ort.SessionOptions()
            fast = self.numerics == "fast"
            if fast:
                so.add_session_config_entry(QDQ_MATMULNBITS_ACCURACY[0], FAST_MATMULNBITS_ACCURACY)
            so = qdq_session_options(self.ort, so)
            so.intra_op_num_threads = self.intra_op_threads
            if self.providers == ["CPUExecutionProvider"]:
                # the host rewrites of host_graph (same arithmetic, less work); float int8
                # weights for exact decode only
                head = self.specs[part_index].head
                budget = self.host_float_left - (0 if head else self.head_reserve)
                model_bytes, arrays = host_model(path, float_weights=ar == 1 and not fast, dynamic_past=self.trim_past,
                                                 budget=max(0, budget), float_pattern=self.float_pattern)
                self.host_float_left -= sum(a.nbytes for a in arrays.values())
                if head and ar == 1:
                    self.head_reserve = 0
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                if arrays:
                    self._host_arrays[key] = [self.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
                    self._host_names[key] = list(arrays)
                    so.add_external_initializers(list(arrays), self._host_arrays[key])
                s = self.ort.InferenceSession(model_bytes, sess_options=so, providers=self.providers)
            else:
                s = self.ort.InferenceSession(str(path), sess_options=so, providers=self.providers)
            self._sessions[key] = s
            self._input_types[key] = {i["name"]: DTYPES[i["dtype"]] for i in part["graphs"][str(ar)]["inputs"]}
        return self._sessions[key]

    def past_window(self, n_past: int, P: int) -> int:
        """How many cache slots a call is fed as its past: all P = CL - AR with static graphs
        (``trim_past`` off), else the filled ``n_past`` rounded up to ``past_bucket`` tokens
        (:data:`PAST_BUCKET`; at least one bucket, at most P)."""
        if not self.trim_past:
            return P
        b = self.past_bucket
        return min(P, max(b, -(-n_past // b) * b))

    def forward(self, input_ids, attention_mask, cos, sin, cache: KVCache, n_past, n_valid, last_only=False):
        AR = input_ids.shape[1]
        P = self.context_length - AR
        W = self.past_window(n_past, P)  # past slots fed: the filled ones, the rest are masked
        if W < P:  # mask columns [0, W) of the past and [P, CL) of this call's tokens
            attention_mask = np.concatenate([attention_mask[..., :W], attention_mask[..., P:]], axis=-1)
        hidden = None  # the boundary tensor between two parts, passed on as it is (one name, one encoding)
        logits = None
        for i, (part, spec) in enumerate(zip(self.manifest.parts, self.specs)):
            sess = self.session(i, AR)
            types = self._input_types[(i, AR)]
            name = part["name"]
            if spec.embedding:
                (hidden,) = sess.run(None, {"input_ids": input_ids.astype(np.int32)})
                continue
            feeds = {
                spec.hidden_in: hidden,
                "attention_mask": self._input(name, "attention_mask", attention_mask, types),
                "position_ids_cos": self._input(name, "position_ids_cos", cos, types),
                "position_ids_sin": self._input(name, "position_ids_sin", sin, types),
            }
            layers = spec.layers
            for l in layers:
                k, v = cache.past(l, W)
                feeds[f"past_key_{l}_in"] = np.ascontiguousarray(k)
                feeds[f"past_value_{l}_in"] = np.ascontiguousarray(v)
            names = [o["name"] for o in part["graphs"][str(AR)]["outputs"]]
            outs = dict(zip(names, sess.run(names, feeds)))
            for l in layers:
                cache.write(l, n_past, outs[f"past_key_{l}_out"], outs[f"past_value_{l}_out"], n_valid)
            if spec.head:
                logits = outs["logits"]
                logits_enc = self.encodings.get(f"{name}:logits")
            else:
                hidden = outs[spec.hidden_out]
        rows = logits[0, n_valid - 1 : n_valid] if last_only else logits[0, :n_valid]
        return logits_enc.dequantize(rows) if logits_enc is not None else rows.astype(np.float32)

    def _input(self, part_name: str, name: str, x: np.ndarray, types) -> np.ndarray:
        """A float host input in the graph's dtype: quantized with the manifest's encoding for a
        quantized graph, cast for a float one."""
        enc = self.encodings.get(f"{part_name}:{name}")
        return enc.quantize(x) if enc is not None else x.astype(types[name], copy=False)
