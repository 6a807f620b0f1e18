"""qnn/context_binary.py: the graphs, tensors and scale/offset encodings of a QNN context binary, read with libQnnSystem.

Tiny QDQ models (a MatMul with an int8 weight, uint16 / float32 inputs, uint16 / uint8 outputs)
are compiled for snapdragon-8-elite (soc_model 69, HTP v79) by onnxruntime-qnn in a child
process (the QNN libraries may crash at interpreter exit); what the reader returns is compared
with the ONNX models' own inputs, outputs and Q/DQ parameters and with the EPContext wrappers'
partition names.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime_qnn")

from qwen_ondevice.core.errors import UserError  # noqa: E402
from qwen_ondevice.qnn.context_binary import GraphInfo, QnnBinaryError, TensorInfo, read_context_binary  # noqa: E402

GRAPH_NAME = re.compile(r"QNNExecutionProvider_QNNExecutionProvider_\d+_1_0")


def _qdq_model(path: Path, k: int, n: int, seed: int) -> Path:
    """x (uint16, QDQ) @ W (int8, DQ) + r (float32, quantized to uint16 in the graph) -> y (uint16), z (uint8)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(0.0123 + seed * 1e-3, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(32768 - seed, np.uint16), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.005, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.002, np.float32), "r_scale"),
        numpy_helper.from_array(np.array(1000, np.uint16), "r_zp"),
        numpy_helper.from_array(np.array(0.0456, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(30000 + seed, np.uint16), "y_zp"),
        numpy_helper.from_array(np.array(0.25, np.float32), "z_scale"),
        numpy_helper.from_array(np.array(100 + seed, np.uint8), "z_zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"]),
        helper.make_node("MatMul", ["x_f", "w_f"], ["mm"]),
        helper.make_node("QuantizeLinear", ["r", "r_scale", "r_zp"], ["r_q"]),
        helper.make_node("DequantizeLinear", ["r_q", "r_scale", "r_zp"], ["r_f"]),
        helper.make_node("Add", ["mm", "r_f"], ["y_f"]),
        helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zp"], ["y"]),
        helper.make_node("QuantizeLinear", ["y_f", "z_scale", "z_zp"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, f"tiny{seed}",
        [helper.make_tensor_value_info("x", TensorProto.UINT16, [1, 4, k]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, n])],
        [helper.make_tensor_value_info("y", TensorProto.UINT16, [1, 4, n]),
         helper.make_tensor_value_info("z", TensorProto.UINT8, [1, 4, n])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


_COMPILE = textwrap.dedent("""
    import os, sys
    import onnxruntime as ort, onnxruntime_qnn
    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]

    def compile(src, wrapper, **extra):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        for k, v in {"ep.context_enable": "1", "ep.context_embed_mode": "0", "ep.context_file_path": wrapper,
                     **extra}.items():
            so.add_session_config_entry(k, v)
        so.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(),
                                              "soc_model": "69", "htp_arch": "79"})
        ort.InferenceSession(src, sess_options=so)

    src_a, src_b, one, two_a, two_b = sys.argv[1:]
    compile(src_a, one)
    compile(src_a, two_a, **{"ep.share_ep_contexts": "1"})
    compile(src_b, two_b, **{"ep.share_ep_contexts": "1", "ep.stop_share_ep_contexts": "1"})
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Model A alone in one context; models A and B as two graphs of one shared context."""
    d = tmp_path_factory.mktemp("qnn_binary")
    (d / "one").mkdir()
    (d / "two").mkdir()
    src_a = _qdq_model(d / "a.onnx", k=16, n=8, seed=0)
    src_b = _qdq_model(d / "b.onnx", k=32, n=16, seed=1)
    wrappers = {"one": d / "one" / "a.ctx.onnx", "two_a": d / "two" / "a.ctx.onnx", "two_b": d / "two" / "b.ctx.onnx"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(src_a), str(src_b), *map(str, wrappers.values())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and all(w.is_file() for w in wrappers.values()), r.stderr[-3000:]
    return {"a": src_a, "b": src_b, **wrappers}


def _epcontext(wrapper: Path) -> tuple[str, Path]:
    """(partition_name, the .bin it points at) of the wrapper's EPContext node."""
    (node,) = [n for n in onnx.load(wrapper).graph.node if n.op_type == "EPContext"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs["partition_name"].decode(), wrapper.parent / attrs["ep_cache_context"].decode()


_QNN_QUANTIZED = {TensorProto.UINT8: "ufixed_point_8", TensorProto.UINT16: "ufixed_point_16",
                  TensorProto.INT8: "sfixed_point_8", TensorProto.INT16: "sfixed_point_16"}
_QNN_FLOAT = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def _expected(src: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The model's own graph inputs and outputs as TensorInfo: the data type and shape of the
    value info; the scale and offset (= -zero point) of the DequantizeLinear reading a quantized
    input / the QuantizeLinear writing a quantized output; none for a float tensor."""
    model = onnx.load(src)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def info(vi, qdq_op: str, io: int) -> TensorInfo:
        elem = vi.type.tensor_type.elem_type
        dims = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        if elem in _QNN_FLOAT:
            return TensorInfo(vi.name, _QNN_FLOAT[elem], dims, None, None)
        (node,) = [n for n in model.graph.node if n.op_type == qdq_op
                   and (n.input[0] if io == 0 else n.output[0]) == vi.name]
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        return TensorInfo(vi.name, _QNN_QUANTIZED[elem], dims, float(scale), -int(zp))

    return ([info(vi, "DequantizeLinear", 0) for vi in model.graph.input],
            [info(vi, "QuantizeLinear", 1) for vi in model.graph.output])


def _assert_matches(graph: GraphInfo, src: Path) -> None:
    inputs, outputs = _expected(src)
    assert sorted(graph.inputs, key=lambda t: t.name) == sorted(inputs, key=lambda t: t.name)
    assert sorted(graph.outputs, key=lambda t: t.name) == sorted(outputs, key=lambda t: t.name)


def test_one_graph_matches_the_onnx_model(compiled):
    partition, bin_path = _epcontext(compiled["one"])
    graphs = read_context_binary(bin_path)
    assert len(graphs) == 1
    (g,) = graphs
    assert GRAPH_NAME.fullmatch(g.name) and g.name == partition
    _assert_matches(g, compiled["a"])
    # spot values straight from the model: uint16 x with zero point 32768 at scale 0.0123
    x = {t.name: t for t in g.inputs}["x"]
    assert (x.dtype, x.dims, x.offset) == ("ufixed_point_16", (1, 4, 16), -32768)
    assert x.scale == pytest.approx(0.0123, rel=1e-6)
    assert {t.name: t for t in g.inputs}["r"].dtype == "float32"
    assert g.to_dict()["inputs"][0]["dims"] == list(g.inputs[0].dims)


def test_two_graphs_of_one_shared_context(compiled):
    (part_a, bin_a), (part_b, bin_b) = _epcontext(compiled["two_a"]), _epcontext(compiled["two_b"])
    assert bin_a == bin_b  # one shared context binary
    graphs = {g.name: g for g in read_context_binary(bin_a)}
    assert len(graphs) == 2 and set(graphs) == {part_a, part_b}
    _assert_matches(graphs[part_a], compiled["a"])
    _assert_matches(graphs[part_b], compiled["b"])


def test_a_missing_file_is_a_user_error_naming_it(tmp_path):
    missing = tmp_path / "nothing_here.bin"
    with pytest.raises(QnnBinaryError, match="nothing_here.bin") as e:
        read_context_binary(missing)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_non_qnn_file_is_refused_naming_it(tmp_path):
    junk = tmp_path / "random_bytes.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    with pytest.raises(QnnBinaryError, match="random_bytes.bin") as e:
        read_context_binary(junk)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_missing_qnn_system_library_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    import qwen_ondevice.qnn.context_binary as qnn_binary

    binary = tmp_path / "some_context.bin"
    binary.write_bytes(b"\0" * 1024)
    monkeypatch.setattr(qnn_binary, "_SYSTEM", None)  # as if not loaded yet in this process
    monkeypatch.setattr(qnn_binary, "_library_path", lambda: tmp_path / "libQnnSystem.so")
    with pytest.raises(QnnBinaryError, match=r"some_context\.bin: .*libQnnSystem\.so does not exist"):
        read_context_binary(binary)
