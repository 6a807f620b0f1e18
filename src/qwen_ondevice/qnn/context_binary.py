"""Read the graphs, tensor names, shapes, data types and scale/offset encodings of a QNN context binary.

A QNN context binary (the ``.bin`` beside an EPContext ``*.ctx.onnx`` wrapper) is opened with
``QnnSystemContext_getBinaryInfo`` from the ``libQnnSystem.so`` shipped inside the
``onnxruntime-qnn`` wheel, through :mod:`ctypes`. Nothing of QNN's needs to be compiled and no
backend (HTP, CPU) is loaded: the system library only parses the binary's metadata.

The ``ctypes`` layouts below follow the QAIRT SDK headers ``System/QnnSystemInterface.h``
(``QnnSystemInterface_t``, the ``QNN_SYSTEM_INTERFACE_VER_TYPE`` function table),
``System/QnnSystemContext.h`` (``QnnSystemContext_BinaryInfo_t`` V1-V3,
``QnnSystemContext_GraphInfo_t`` V1-V3), ``QnnTypes.h`` (``Qnn_Tensor_t`` V1/V2,
``Qnn_QuantizeParams_t``, ``Qnn_DataType_t``, ``Qnn_Version_t``) and ``QnnCommon.h``
(``Qnn_ErrorHandle_t``), as of the QAIRT version the pinned onnxruntime-qnn wheel carries
(``onnxruntime_qnn.build_and_package_info.qnn_version``, 2.51 for onnxruntime-qnn 2.7). Every
versioned struct's ``version`` field is checked; a version this module does not know raises
:class:`QnnBinaryError` rather than being read with a guessed layout. Only the 64-bit layout is
described (the wheel is Linux x86_64 / Windows arm64 only).

The file is memory-mapped (copy-on-write, so QNN's non-const buffer argument can never write to
the file) and its address is handed to QNN: a multi-gigabyte binary is neither read into Python
nor copied. Everything QNN returns is copied into plain Python values before the system-context
handle is freed and the mapping closed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from qwen_ondevice.core.errors import UserError

__all__ = ["GraphInfo", "QnnBinaryError", "TensorInfo", "read_context_binary"]


class QnnBinaryError(UserError):
    """A QNN context binary cannot be read: the QNN system library is missing, the file cannot
    be opened, or QNN refuses it. The message is one line and names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as the context binary describes it.

    ``dtype`` is QNN's data type (``Qnn_DataType_t``) as a short name: the enum name without
    ``QNN_DATATYPE_``, lowercased, with plain integer / float / bool types written without the
    underscore before their width (``uint8``, ``int32``, ``float16``, ``bfloat16``, ``bool8``)
    and fixed-point types as named (``ufixed_point_16``, ``sfixed_point_8``). ``scale`` and
    ``offset`` are the per-tensor scale/offset encoding (``QNN_QUANTIZATION_ENCODING_SCALE_OFFSET``,
    real = (q + offset) * scale, so ``offset == -zero_point``); both are None for a tensor
    without one (float tensors, per-axis or other encodings).
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    scale: float | None
    offset: int | None

    def to_dict(self) -> dict:
        """JSON-ready ``{"name", "dtype", "dims" (list), "scale", "offset"}``."""
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "scale": self.scale,
                "offset": self.offset}


@dataclass(frozen=True)
class GraphInfo:
    """One graph of a context binary: its name and its inputs and outputs in QNN's order."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict:
        """JSON-ready ``{"name", "inputs": [tensor dicts], "outputs": [tensor dicts]}``."""
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


# --------------------------------------------------------------------------------------------
# ctypes layouts (QnnCommon.h, QnnTypes.h, System/QnnSystemContext.h, System/QnnSystemInterface.h)
# --------------------------------------------------------------------------------------------

_ErrorHandle = ctypes.c_uint64  # Qnn_ErrorHandle_t; the error code is its low 16 bits
_QNN_SUCCESS = 0


class _Version(ctypes.Structure):  # Qnn_Version_t
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("patch", ctypes.c_uint32)]


class _ScaleOffset(ctypes.Structure):  # Qnn_ScaleOffset_t
    _fields_ = [("scale", ctypes.c_float), ("offset", ctypes.c_int32)]


class _BwAxisScaleOffset(ctypes.Structure):  # Qnn_BwAxisScaleOffset_t: the union's largest value member
    _fields_ = [("bitwidth", ctypes.c_uint32), ("axis", ctypes.c_int32), ("numElements", ctypes.c_uint32),
                ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p)]


class _BwFloatBlockEncoding(ctypes.Structure):  # Qnn_BwFloatBlockEncoding_t
    _fields_ = [("bitwidth", ctypes.c_uint32), ("blockSize", ctypes.c_void_p), ("floatScaleOffset", ctypes.c_void_p)]


class _QuantizeUnion(ctypes.Union):
    # Only scaleOffsetEncoding is read; the others fix the union's size (32) and alignment (8).
    _fields_ = [("scaleOffsetEncoding", _ScaleOffset), ("bwAxisScaleOffsetEncoding", _BwAxisScaleOffset),
                ("bwFloatBlockEncoding", _BwFloatBlockEncoding), ("pointer", ctypes.c_void_p)]


class _QuantizeParams(ctypes.Structure):  # Qnn_QuantizeParams_t
    _anonymous_ = ("u",)
    _fields_ = [("encodingDefinition", ctypes.c_int32), ("quantizationEncoding", ctypes.c_int32),
                ("u", _QuantizeUnion)]


class _ClientBuffer(ctypes.Structure):  # Qnn_ClientBuffer_t
    _fields_ = [("data", ctypes.c_void_p), ("dataSize", ctypes.c_uint32)]


class _TensorDataUnion(ctypes.Union):  # clientBuf / memHandle / retrieveRaw
    _fields_ = [("clientBuf", _ClientBuffer), ("memHandle", ctypes.c_void_p), ("retrieveRaw", ctypes.c_void_p)]


_TENSOR_COMMON = [  # Qnn_TensorV1_t; Qnn_TensorV2_t starts with the same fields
    ("id", ctypes.c_uint32), ("name", ctypes.c_char_p), ("type", ctypes.c_int32), ("dataFormat", ctypes.c_uint32),
    ("dataType", ctypes.c_int32), ("quantizeParams", _QuantizeParams), ("rank", ctypes.c_uint32),
    ("dimensions", ctypes.POINTER(ctypes.c_uint32)), ("memType", ctypes.c_int32), ("data", _TensorDataUnion),
]


class _TensorV1(ctypes.Structure):  # Qnn_TensorV1_t
    _fields_ = _TENSOR_COMMON


class _SparseParams(ctypes.Structure):  # Qnn_SparseParams_t (type + Qnn_SparseLayoutHybridCoo_t)
    _fields_ = [("type", ctypes.c_int32), ("numSpecifiedElements", ctypes.c_uint32),
                ("numSparseDimensions", ctypes.c_uint32)]


class _TensorV2(ctypes.Structure):  # Qnn_TensorV2_t
    _fields_ = _TENSOR_COMMON + [("isDynamicDimensions", ctypes.c_void_p), ("sparseParams", _SparseParams),
                                 ("isProduced", ctypes.c_uint8)]


class _TensorUnion(ctypes.Union):
    _fields_ = [("v1", _TensorV1), ("v2", _TensorV2)]


class _Tensor(ctypes.Structure):  # Qnn_Tensor_t (arrays of it are by value: its size is the stride)
    _anonymous_ = ("u",)
    _fields_ = [("version", ctypes.c_int32), ("u", _TensorUnion)]


_GRAPH_V1 = [("graphName", ctypes.c_char_p), ("numGraphInputs", ctypes.c_uint32),
             ("graphInputs", ctypes.POINTER(_Tensor)), ("numGraphOutputs", ctypes.c_uint32),
             ("graphOutputs", ctypes.POINTER(_Tensor))]
_GRAPH_V2 = _GRAPH_V1 + [("numUpdateableTensors", ctypes.c_uint32), ("updateableTensors", ctypes.POINTER(_Tensor))]
_GRAPH_V3 = _GRAPH_V2 + [("graphBlobInfoSize", ctypes.c_uint32), ("graphBlobInfo", ctypes.c_void_p),
                         ("startOpIndex", ctypes.c_uint32), ("endOpIndex", ctypes.c_uint32)]


class _GraphInfoV1(ctypes.Structure):  # QnnSystemContext_GraphInfoV1_t
    _fields_ = _GRAPH_V1


class _GraphInfoV2(ctypes.Structure):  # QnnSystemContext_GraphInfoV2_t
    _fields_ = _GRAPH_V2


class _GraphInfoV3(ctypes.Structure):  # QnnSystemContext_GraphInfoV3_t
    _fields_ = _GRAPH_V3


class _GraphInfoUnion(ctypes.Union):
    _fields_ = [("graphInfoV1", _GraphInfoV1), ("graphInfoV2", _GraphInfoV2), ("graphInfoV3", _GraphInfoV3)]


class _GraphInfo(ctypes.Structure):  # QnnSystemContext_GraphInfo_t
    _anonymous_ = ("u",)
    _fields_ = [("version", ctypes.c_int32), ("u", _GraphInfoUnion)]


_BINARY_V1 = [
    ("backendId", ctypes.c_uint32), ("buildId", ctypes.c_char_p), ("coreApiVersion", _Version),
    ("backendApiVersion", _Version), ("socVersion", ctypes.c_char_p), ("hwInfoBlobVersion", _Version),
    ("contextBlobVersion", _Version), ("hwInfoBlobSize", ctypes.c_uint32), ("hwInfoBlob", ctypes.c_void_p),
    ("contextBlobSize", ctypes.c_uint64), ("numContextTensors", ctypes.c_uint32),
    ("contextTensors", ctypes.POINTER(_Tensor)), ("numGraphs", ctypes.c_uint32),
    ("graphs", ctypes.POINTER(_GraphInfo)),
]


class _BinaryInfoV1(ctypes.Structure):  # QnnSystemContext_BinaryInfoV1_t
    _fields_ = _BINARY_V1


class _BinaryInfoV2(ctypes.Structure):  # QnnSystemContext_BinaryInfoV2_t
    _fields_ = _BINARY_V1 + [("platformInfo", ctypes.c_void_p)]


class _BinaryInfoV3(ctypes.Structure):  # QnnSystemContext_BinaryInfoV3_t (no hwInfoBlob fields)
    _fields_ = [
        ("backendId", ctypes.c_uint32), ("buildId", ctypes.c_char_p), ("coreApiVersion", _Version),
        ("backendApiVersion", _Version), ("socVersion", ctypes.c_char_p), ("contextBlobVersion", _Version),
        ("contextBlobSize", ctypes.c_uint64), ("numContextTensors", ctypes.c_uint32),
        ("contextTensors", ctypes.POINTER(_Tensor)), ("numGraphs", ctypes.c_uint32),
        ("graphs", ctypes.POINTER(_GraphInfo)), ("platformInfo", ctypes.c_void_p),
        ("contextMetadataSize", ctypes.c_uint32), ("contextMetadata", ctypes.c_void_p),
        ("socModel", ctypes.c_uint32),
    ]


class _BinaryInfoUnion(ctypes.Union):
    _fields_ = [("contextBinaryInfoV1", _BinaryInfoV1), ("contextBinaryInfoV2", _BinaryInfoV2),
                ("contextBinaryInfoV3", _BinaryInfoV3)]


class _BinaryInfo(ctypes.Structure):  # QnnSystemContext_BinaryInfo_t
    _anonymous_ = ("u",)
    _fields_ = [("version", ctypes.c_int32), ("u", _BinaryInfoUnion)]


_SystemContextCreateFn = ctypes.CFUNCTYPE(_ErrorHandle, ctypes.POINTER(ctypes.c_void_p))
_SystemContextGetBinaryInfoFn = ctypes.CFUNCTYPE(
    _ErrorHandle, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(ctypes.POINTER(_BinaryInfo)),
    ctypes.POINTER(ctypes.c_uint64))
_SystemContextFreeFn = ctypes.CFUNCTYPE(_ErrorHandle, ctypes.c_void_p)


class _SystemInterfaceFunctions(ctypes.Structure):
    """The head of QNN_SYSTEM_INTERFACE_VER_TYPE (QnnSystemInterface_ImplementationV1_x_t): the
    system-context entries come first; later entries (tensor, log, DLC, profile) are not used."""

    _fields_ = [("systemContextCreate", ctypes.c_void_p), ("systemContextGetBinaryInfo", ctypes.c_void_p),
                ("systemContextGetMetaData", ctypes.c_void_p), ("systemContextFree", ctypes.c_void_p)]


class _SystemInterface(ctypes.Structure):  # QnnSystemInterface_t
    _fields_ = [("backendId", ctypes.c_uint32), ("providerName", ctypes.c_char_p),
                ("systemApiVersion", _Version), ("functions", _SystemInterfaceFunctions)]


_SYSTEM_API_MAJOR = 1  # QNN_SYSTEM_API_VERSION_MAJOR of the headers above

# Qnn_DataType_t values (QnnTypes.h) -> short names
_DTYPES = {
    0x0008: "int8", 0x0016: "int16", 0x0032: "int32", 0x0064: "int64",
    0x0108: "uint8", 0x0116: "uint16", 0x0132: "uint32", 0x0164: "uint64",
    0x0216: "float16", 0x0226: "bfloat16", 0x0232: "float32", 0x0264: "float64",
    0x0304: "sfixed_point_4", 0x0308: "sfixed_point_8", 0x0316: "sfixed_point_16", 0x0332: "sfixed_point_32",
    0x0404: "ufixed_point_4", 0x0408: "ufixed_point_8", 0x0416: "ufixed_point_16", 0x0432: "ufixed_point_32",
    0x0508: "bool8", 0x0608: "string",
}
_DEFINITION_DEFINED = 1  # Qnn_Definition_t QNN_DEFINITION_DEFINED
_ENCODING_SCALE_OFFSET = 0  # Qnn_QuantizationEncoding_t QNN_QUANTIZATION_ENCODING_SCALE_OFFSET
_ERRORS = {  # QnnCommon.h / System/QnnSystemCommon.h / System/QnnSystemContext.h error codes
    1000: "QNN_COMMON_ERROR_NOT_SUPPORTED", 1002: "QNN_COMMON_ERROR_MEM_ALLOC",
    1004: "QNN_COMMON_ERROR_INVALID_ARGUMENT", 30002: "QNN_SYSTEM_CONTEXT_ERROR_OPERATION_FAILED",
    30010: "QNN_SYSTEM_CONTEXT_ERROR_MALFORMED_BINARY",
}

# --------------------------------------------------------------------------------------------
# Loading libQnnSystem.so (once per process: QNN libraries are not meant to be unloaded)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _System:
    library: ctypes.CDLL  # kept alive: the function table lives as long as the library
    create: object
    get_binary_info: object
    free: object


_LOCK = threading.Lock()
_SYSTEM: _System | None = None


def _library_path() -> Path:
    """``libQnnSystem.so`` (``QnnSystem.dll`` on Windows) inside the installed onnxruntime-qnn wheel."""
    import onnxruntime_qnn

    folder = Path(onnxruntime_qnn.__file__).resolve().parent
    return folder / ("QnnSystem.dll" if sys.platform == "win32" else "libQnnSystem.so")


def _load_system(path: Path) -> _System:
    """Load the QNN system library and pick its system-context functions.

    Raises:
        QnnBinaryError: naming ``path`` (the binary being read) when onnxruntime-qnn is missing,
            its libQnnSystem cannot be loaded, or it offers no usable interface.
    """
    global _SYSTEM
    with _LOCK:
        if _SYSTEM is not None:
            return _SYSTEM
        try:
            lib_path = _library_path()
        except ImportError:
            raise QnnBinaryError(f"{path}: cannot read a QNN context binary: onnxruntime-qnn is not installed "
                                 "(it ships libQnnSystem.so)") from None
        if not lib_path.is_file():
            raise QnnBinaryError(f"{path}: cannot read a QNN context binary: {lib_path} does not exist "
                                 "in this onnxruntime-qnn")
        try:
            lib = _dlopen(lib_path)
        except OSError as e:
            msg = str(e).replace("\n", " ")
            raise QnnBinaryError(f"{path}: cannot read a QNN context binary: loading {lib_path} failed ({msg})") from None

        try:
            get_providers = lib.QnnSystemInterface_getProviders
        except AttributeError:
            raise QnnBinaryError(f"{path}: cannot read a QNN context binary: {lib_path} has no "
                                 "QnnSystemInterface_getProviders") from None
        get_providers.restype = _ErrorHandle
        get_providers.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.POINTER(_SystemInterface))),
                                  ctypes.POINTER(ctypes.c_uint32)]
        providers = ctypes.POINTER(ctypes.POINTER(_SystemInterface))()
        count = ctypes.c_uint32(0)
        err = get_providers(ctypes.byref(providers), ctypes.byref(count))
        if err != _QNN_SUCCESS or not providers or count.value == 0:
            raise QnnBinaryError(f"{path}: cannot read a QNN context binary: {lib_path.name} offers no system "
                                 f"interface ({_describe(err)})")
        found = []
        for i in range(count.value):
            p = providers[i].contents if providers[i] else None
            if p is None:
                continue
            v = p.systemApiVersion
            found.append(f"{v.major}.{v.minor}.{v.patch}")
            f = p.functions
            if v.major == _SYSTEM_API_MAJOR and f.systemContextCreate and f.systemContextGetBinaryInfo \
                    and f.systemContextFree:
                _SYSTEM = _System(lib, _SystemContextCreateFn(f.systemContextCreate),
                                  _SystemContextGetBinaryInfoFn(f.systemContextGetBinaryInfo),
                                  _SystemContextFreeFn(f.systemContextFree))
                return _SYSTEM
        raise QnnBinaryError(f"{path}: cannot read a QNN context binary: {lib_path.name} offers system API "
                             f"version(s) {', '.join(found) or 'none'}, this reader handles {_SYSTEM_API_MAJOR}.x")


def _dlopen(lib_path: Path) -> ctypes.CDLL:
    """Open ``lib_path``; if its dependencies are not found through its RPATH, preload the
    wheel's bundled C++ runtime (the sibling ``onnxruntime_qnn.libs`` folder) and retry."""
    try:
        return ctypes.CDLL(str(lib_path))
    except OSError:
        libs = lib_path.parent.parent / f"{lib_path.parent.name}.libs"
        if not libs.is_dir():
            raise
        # dependency order: libunwind <- libc++abi <- libc++
        for prefix in ("libunwind", "libc++abi", "libc++-", "libc++."):
            for dep in sorted(libs.glob(f"{prefix}*")):
                ctypes.CDLL(str(dep), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(str(lib_path))


def _describe(err: int) -> str:
    code = int(err) & 0xFFFF
    return f"{_ERRORS[code]}, code {code}" if code in _ERRORS else f"QNN error code {code}"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_context_binary(path: Path) -> list[GraphInfo]:
    """The graphs of the QNN context binary at ``path``, in the binary's order.

    Each :class:`GraphInfo` names the graph (for ONNX Runtime's EPContext wrappers, the
    ``partition_name`` attribute of the EPContext node) and lists its inputs and outputs with
    their names, QNN data type, dimensions (``dims``: one int per axis, QNN's order, e.g.
    ``(1, 128, 896)``) and per-tensor scale/offset. The file is memory-mapped, never copied into
    Python memory; binaries of several gigabytes are fine.

    Raises:
        QnnBinaryError: one line naming ``path`` when onnxruntime-qnn / libQnnSystem is missing
            or cannot be loaded, the file does not exist, is empty or cannot be read, QNN refuses
            it (not a context binary, corrupt, from an incompatible QAIRT), or a struct carries a
            version this reader does not handle.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise QnnBinaryError(f"{path}: no such file (expected a QNN context binary)") from None
    except OSError as e:
        raise QnnBinaryError(f"{path}: cannot open the QNN context binary ({e.strerror or e})") from None
    with f:
        size = _file_size(f, path)
        if size == 0:
            raise QnnBinaryError(f"{path}: empty file, not a QNN context binary")
        system = _load_system(path)
        try:
            # Copy-on-write: writable for ctypes' from_buffer, yet nothing ever reaches the file.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise QnnBinaryError(f"{path}: cannot memory-map the QNN context binary ({e})") from None
    try:
        # The mapping's address; the ctypes view is dropped at once so that no exported buffer
        # (kept alive by, say, a traceback) can stop the mapping from closing. The address stays
        # valid until mapped.close() below, after everything has been copied out.
        view = ctypes.c_char.from_buffer(mapped)
        address = ctypes.addressof(view)
        del view
        return _read_info(system, address, len(mapped), path)
    finally:
        mapped.close()


def _file_size(f, path: Path) -> int:
    try:
        st = os.fstat(f.fileno())
    except OSError as e:
        raise QnnBinaryError(f"{path}: cannot read the QNN context binary ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise QnnBinaryError(f"{path}: not a regular file (expected a QNN context binary)")
    return st.st_size


def _read_info(system: _System, address: int, size: int, path: Path) -> list[GraphInfo]:
    """Create a system context, parse the ``size`` bytes at ``address`` and copy every graph out;
    free the context."""
    handle = ctypes.c_void_p()
    err = system.create(ctypes.byref(handle))
    if err != _QNN_SUCCESS or not handle:
        raise QnnBinaryError(f"{path}: QNN could not create a system context ({_describe(err)})")
    try:
        info = ctypes.POINTER(_BinaryInfo)()
        info_size = ctypes.c_uint64(0)
        err = system.get_binary_info(handle, address, size, ctypes.byref(info),
                                     ctypes.byref(info_size))
        if err != _QNN_SUCCESS or not info:
            raise QnnBinaryError(f"{path}: QNN refuses it as a context binary ({_describe(err)})")
        return _copy_graphs(info.contents, path)
    finally:
        system.free(handle)


def _versioned(struct, members: str, what: str, path: Path):
    """The union member of a versioned QNN struct for its ``version`` (``<members>V1``..``V3``).

    Raises:
        QnnBinaryError: a version this reader does not know.
    """
    if struct.version not in (1, 2, 3):
        raise QnnBinaryError(f"{path}: {what} version {struct.version} is not handled (this reader knows versions 1-3)")
    return getattr(struct, f"{members}V{struct.version}")


def _copy_graphs(info: _BinaryInfo, path: Path) -> list[GraphInfo]:
    b = _versioned(info, "contextBinaryInfo", "QnnSystemContext_BinaryInfo_t", path)
    n = int(b.numGraphs)
    if n and not b.graphs:
        raise QnnBinaryError(f"{path}: QNN reports {n} graph(s) but no graph list")
    graphs = []
    for i in range(n):
        gi = _versioned(b.graphs[i], "graphInfo", f"QnnSystemContext_GraphInfo_t (graph {i})", path)
        name = _text(gi.graphName)
        graphs.append(GraphInfo(
            name=name,
            inputs=_copy_tensors(gi.graphInputs, gi.numGraphInputs, path, f"graph {name!r} input"),
            outputs=_copy_tensors(gi.graphOutputs, gi.numGraphOutputs, path, f"graph {name!r} output"),
        ))
    return graphs


def _copy_tensors(array, count: int, path: Path, what: str) -> tuple[TensorInfo, ...]:
    count = int(count)
    if count and not array:
        raise QnnBinaryError(f"{path}: QNN reports {count} {what}(s) but no tensor list")
    out = []
    for i in range(count):
        t = array[i]
        if t.version == 1:
            v = t.v1
        elif t.version == 2:
            v = t.v2
        else:
            raise QnnBinaryError(f"{path}: Qnn_Tensor_t version {t.version} ({what} {i}) is not handled "
                                 "(this reader knows versions 1-2)")
        rank = int(v.rank)
        if rank and not v.dimensions:
            raise QnnBinaryError(f"{path}: {what} {i} has rank {rank} but no dimensions")
        dims = tuple(int(v.dimensions[k]) for k in range(rank))
        q = v.quantizeParams
        if q.encodingDefinition == _DEFINITION_DEFINED and q.quantizationEncoding == _ENCODING_SCALE_OFFSET:
            scale, offset = float(q.scaleOffsetEncoding.scale), int(q.scaleOffsetEncoding.offset)
        else:
            scale, offset = None, None
        dtype = _DTYPES.get(int(v.dataType) & 0xFFFFFFFF, f"unknown_0x{int(v.dataType) & 0xFFFFFFFF:04x}")
        out.append(TensorInfo(name=_text(v.name), dtype=dtype, dims=dims, scale=scale, offset=offset))
    return tuple(out)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw else ""
