"""The ``ort-cpu`` backend: a bundle's ONNX parts on ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..encodings import Encoding
from ..engine import Backend, KVCache

DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "uint16": np.uint16, "int32": np.int32}

#: ONNX Runtime fuses ``DequantizeLinear(int4/int8 weight) -> MatMul`` into ``MatMulNBits``, whose
#: default accuracy level (4) quantizes the activations to int8 blocks inside the product: far
#: coarser than the uint16 activations of the QDQ model, so the CPU run would no longer simulate
#: the device numerics. Level 1 keeps the fused kernel but computes in fp32, like the QDQ graph.
QDQ_MATMULNBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


#: Host memory (bytes) one AR-1 session may spend on int8 weights dequantized once (host_float_weights).
HOST_FLOAT_BUDGET = 4 << 30


def host_float_weights(model_path: Path, budget: int = HOST_FLOAT_BUDGET) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """The QDQ graph at ``model_path`` with its int8 MatMul weights dequantized once, for the host.

    ONNX Runtime fuses ``DequantizeLinear(int8 weight (K, N), per-channel scale) -> MatMul`` into
    a MatMulNBits whose 8-bit kernel at the fp32 accuracy level the QDQ simulation needs
    (:data:`QDQ_MATMULNBITS_ACCURACY`) dequantizes the whole weight again on every call (per-channel
    or block-wise alike): the int8 lm_head alone is 0.8 s of a 1.1 s AR-1 call on the demo model
    (ORT profiler). Here each int8 weight is dequantized once, ``W = (q - zero) * scale`` in
    float32 (DequantizeLinear's own formula), and the MatMul reads that float initializer: the same
    arithmetic as the QDQ graph, at 4 bytes per weight of host memory. Weights are taken largest
    first (the lm_head, then int8 projections) while they fit in ``budget`` bytes; the rest keep
    the fused kernel. int4 weights keep MatMulNBits, whose 4-bit kernel is fast.

    Returns (serialized model, {initializer name: float32 (K, N) array}) to pass to
    ``SessionOptions.add_external_initializers``, or None when nothing was rewritten.
    """
    import onnx
    from onnx import TensorProto

    from ..qdq import read_initializer

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    candidates = []
    for n in g.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 2:
            continue
        if any(a.name == "block_size" for a in n.attribute) or not all(u.op_type == "MatMul" for u in users.get(n.output[0], [None])):
            continue
        candidates.append((w.dims[0] * w.dims[1] * 4, n, w))
    base = model_path.parent
    arrays: dict[str, np.ndarray] = {}
    used = 0
    for nbytes, dq, w in sorted(candidates, key=lambda c: -c[0]):
        if used + nbytes > budget:
            continue
        used += nbytes
        q = read_initializer(w, base)  # (K, N) int8
        scale = read_initializer(inits[dq.input[1]], base).astype(np.float32)  # (N,)
        zero = read_initializer(inits[dq.input[2]], base).astype(np.int32) if len(dq.input) > 2 and dq.input[2] else 0
        name = w.name + ".host_float"
        arrays[name] = ((q.astype(np.int32) - zero).astype(np.float32) * scale[None, :]).astype(np.float32)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(w.dims), data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "host_float_weights.bin"), ("offset", "0"), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        g.initializer.append(t)
        for u in users[dq.output[0]]:
            u.input[list(u.input).index(dq.output[0])] = name
        g.node.remove(dq)
        for i in dq.input:  # the int8 weight, scale and zero point, unless another node reads them
            if i and all(u is dq for u in users.get(i, [])) and i in inits:
                g.initializer.remove(inits.pop(i))
    if not arrays:
        return None
    return model.SerializeToString(), arrays


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
    AR-128 graphs). Float inputs are cast to the graph's input dtype; logits come back float32.
    """

    name = "ort-cpu"

    def __init__(self, manifest, providers: list | None = None, session_options=None):
        import onnxruntime as ort

        self.ort = ort
        self.manifest = manifest
        self.config = manifest.config
        self.context_length = manifest.context_length
        self.ar_lengths = tuple(manifest.ar_lengths)
        self.kv_dtype = DTYPES[manifest.data["kv_cache"]["dtype"]]
        self.providers = providers or ["CPUExecutionProvider"]
        self.session_options = session_options
        self.intra_op_threads = session_options.intra_op_num_threads if session_options is not None else 0
        self._sessions: dict[tuple[int, int], object] = {}
        self._input_types: dict[tuple[int, int], dict[str, np.dtype]] = {}
        self._host_arrays: dict[tuple[int, int], list] = {}  # OrtValues that must outlive their session
        self._host_names: dict[tuple[int, int], list[str]] = {}
        # quantized bundles: the encoding of every quantized graph input/output, by name
        self.encodings: dict[str, Encoding] = {}
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
            # decode only: at AR-128 the fused kernel's dequantization is spread over 128 rows and
            # it is faster than the float MatMul (benchmarks/bench_host_speed.py)
            host = host_float_weights(path) if ar == 1 and self.providers == ["CPUExecutionProvider"] else None
            if host is None:
                so = qdq_session_options(self.ort, self.session_options)
                s = self.ort.InferenceSession(str(path), sess_options=so, providers=self.providers)
            else:
                model_bytes, arrays = host
                so = qdq_session_options(self.ort)
                so.intra_op_num_threads = self.intra_op_threads
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                self._host_arrays[key] = [self.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
                self._host_names[key] = list(arrays)
                so.add_external_initializers(list(arrays), self._host_arrays[key])
                s = self.ort.InferenceSession(model_bytes, sess_options=so, providers=self.providers)
            self._sessions[key] = s
            self._input_types[key] = {i["name"]: DTYPES[i["dtype"]] for i in part["graphs"][str(ar)]["inputs"]}
        return self._sessions[key]

    def forward(self, input_ids, attention_mask, cos, sin, cache: KVCache, n_past, n_valid, last_only=False):
        AR = input_ids.shape[1]
        P = self.context_length - AR
        hidden = None
        logits = None
        for i, part in enumerate(self.manifest.parts):
            sess = self.session(i, AR)
            types = self._input_types[(i, AR)]
            name = part["name"]
            if part["embedding"]:
                (hidden,) = sess.run(None, {"input_ids": input_ids.astype(np.int32)})
                hidden_enc = self.encodings.get(f"{name}:hidden_states_out")
                continue
            in_enc = self.encodings.get(f"{name}:hidden_states_in")
            if in_enc is not None and in_enc != hidden_enc:
                hidden = in_enc.quantize(hidden_enc.dequantize(hidden))
            feeds = {
                "hidden_states_in": hidden,
                "attention_mask": self._input(name, "attention_mask", attention_mask, types),
                "position_ids_cos": self._input(name, "position_ids_cos", cos, types),
                "position_ids_sin": self._input(name, "position_ids_sin", sin, types),
            }
            layers = range(*part["layers"])
            for l in layers:
                k, v = cache.past(l, P)
                feeds[f"past_key_{l}_in"] = np.ascontiguousarray(k)
                feeds[f"past_value_{l}_in"] = np.ascontiguousarray(v)
            names = [o["name"] for o in part["graphs"][str(AR)]["outputs"]]
            outs = dict(zip(names, sess.run(names, feeds)))
            for l in layers:
                cache.write(l, n_past, outs[f"past_key_{l}_out"], outs[f"past_value_{l}_out"], n_valid)
            if part["head"]:
                logits = outs["logits"]
                logits_enc = self.encodings.get(f"{name}:logits")
            else:
                hidden = outs["hidden_states_out"]
                hidden_enc = self.encodings.get(f"{name}:hidden_states_out")
        rows = logits[0, n_valid - 1 : n_valid] if last_only else logits[0, :n_valid]
        return logits_enc.dequantize(rows) if logits_enc is not None else rows.astype(np.float32)

    def _input(self, part_name: str, name: str, x: np.ndarray, types) -> np.ndarray:
        """A float host input in the graph's dtype: quantized with the manifest's encoding for a
        quantized graph, cast for a float one."""
        enc = self.encodings.get(f"{part_name}:{name}")
        return enc.quantize(x) if enc is not None else x.astype(types[name], copy=False)
