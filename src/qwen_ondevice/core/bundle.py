"""The bundle folder (docs/bundle-format.md): manifest schema and validation, integrity check, bytes per token."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.files import cache_dir, sha256_file
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.onnx_data import device_weight_bytes
from qwen_ondevice.core.parts import PartSpec

SCHEMA = "qwen-ondevice.bundle"
SCHEMA_VERSION = 2  # 2: part boundaries named hidden_states_{layer}, AI Hub graph names
MANIFEST = "manifest.json"
#: Files copied from the checkpoint (those present); the chat template travels inside
#: tokenizer_config.json and, for newer tokenizers, also as chat_template.jinja.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                    "chat_template.jinja", "special_tokens_map.json")


class _Entry(BaseModel):
    """A manifest object: the fields the runtime reads are typed and required (strict types: a
    number written as a string is an error); other fields are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class EncodingEntry(_Entry):
    scale: float = Field(gt=0)
    zero_point: int
    dtype: Literal["uint8", "uint16", "int8", "int16"]


class TensorEntry(_Entry):
    name: str
    shape: list[int]
    dtype: str
    encoding: EncodingEntry | None = None


class GraphEntry(_Entry):
    file: str
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]


class PartEntry(_Entry):
    index: int = Field(ge=1)
    name: str
    layers: list[int] = Field(min_length=2, max_length=2)
    embedding: bool
    head: bool
    data: str
    weight_bytes: int = Field(ge=0)
    graphs: dict[str, GraphEntry] = Field(min_length=1)


class KvCacheEntry(_Entry):
    dtype: Literal["uint8", "uint16", "float16", "float32"]
    bytes_per_token: int = Field(gt=0)


class FileEntry(_Entry):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class QnnGraphEntry(_Entry):
    qnn_graph: str
    wrapper: str


class QnnPartEntry(_Entry):
    name: str
    bin: str
    bin_bytes: int = Field(ge=0)
    graphs: dict[str, QnnGraphEntry] = Field(min_length=1)


class QnnEntry(_Entry):
    chipset: str
    soc_model: int
    dsp_arch: str
    folder: str
    weight_sharing: bool
    parts: list[QnnPartEntry]


class ModelEntry(_Entry):
    source: str
    config_json: dict


class ManifestModel(_Entry):
    """``manifest.json`` as the runtime reads it (docs/bundle-format.md), validated at open."""

    schema_name: str = Field(alias="schema")
    schema_version: int
    model: ModelEntry
    precision: Literal["fp32", "fp16", "w8a16", "w4a16"]
    ar: list[int] = Field(min_length=1)
    context_length: int = Field(gt=0)
    mask_value: float
    kv_cache: KvCacheEntry
    parts: list[PartEntry] = Field(min_length=1)
    files: dict[str, FileEntry]
    qnn: QnnEntry | None = None


def _field_path(loc: tuple) -> str:
    """('parts', 1, 'graphs', '128', 'file') -> 'parts[1].graphs.128.file'."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def validate_manifest(data: dict, source: str) -> ManifestModel:
    """The typed manifest; a missing or mistyped field is one line naming it.

    Raises:
        UserError: the first field that is missing or has the wrong type or value.
    """
    try:
        return ManifestModel.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = _field_path(tuple(x for x in err["loc"] if x not in ("str", "int", "QnnEntry")))
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:60]})"
        raise UserError(f"{source}: field {where}: {err['msg'].lower()}{got}; re-export the bundle") from None


@dataclass
class Manifest:
    """A parsed ``manifest.json``: the raw dict in ``data``, its validated form in ``typed``."""

    root: Path
    data: dict
    typed: ManifestModel | None = None

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict({**self.data["model"]["config_json"]}, source=str(self.root / MANIFEST))

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def context_length(self) -> int:
        return int(self.data["context_length"])

    @property
    def ar_lengths(self) -> list[int]:
        return [int(a) for a in self.data["ar"]]

    @property
    def parts(self) -> list[dict]:
        return self.data["parts"]

    def part_specs(self) -> list[PartSpec]:
        n = len(self.parts)
        return [PartSpec.from_dict(p, n) for p in self.parts]

    def graph_path(self, part: dict, ar: int) -> Path:
        return self.root / part["graphs"][str(ar)]["file"]


def bytes_per_token(m: Manifest) -> dict:
    """What the device reads per generated token (bytes), from what it actually holds.

    - Weights: each part's QNN context binary (``qnn.parts[].bin_bytes``, measured file sizes) when
      the bundle has them, else the part's weights as the HTP stores them, computed from its ONNX
      graph (:func:`qwen_ondevice.core.onnx_data.device_weight_bytes`); a float bundle's ONNX data.
      The ONNX data of a quantized bundle is not what the device reads (its LPBQ block scales are
      float32 there).
    - The embedding part counts one row (its weights / vocab size): decode gathers one.
    - The KV cache at the bundle's context length (every slot is read by each token).

    Returns a dict: ``weights_counted_from`` ('qnn .bin files', 'computed from the ONNX graphs'
    or 'ONNX data'), per part its ``onnx_data_bytes``, ``device_bytes`` and ``read_per_token``,
    the totals ``weight_bytes`` (ONNX data), ``device_weight_bytes``,
    ``weight_bytes_read_per_token``, ``kv_cache_bytes_per_token``,
    ``kv_cache_bytes_full_context`` and ``bytes_per_token_full_context``.
    """
    data = m.data
    vocab = data["model"]["config_json"]["vocab_size"]
    bins = {p["name"]: p["bin_bytes"] for p in (data.get("qnn") or {}).get("parts", [])}
    quantized = data["precision"] in ("w8a16", "w4a16")
    source = "qnn .bin files" if quantized and bins else "computed from the ONNX graphs" if quantized else "ONNX data"
    parts = []
    for p in data["parts"]:
        if quantized:
            graph = onnx.load(str(m.graph_path(p, min(int(a) for a in p["graphs"]))), load_external_data=False)
            computed = device_weight_bytes(graph)
        else:
            computed = p["weight_bytes"]
        device = bins.get(p["name"], computed)  # only quantized bundles have binaries
        parts.append({"name": p["name"], "onnx_data_bytes": p["weight_bytes"], "device_bytes": device,
                      **({"bin_bytes": bins[p["name"]]} if p["name"] in bins else {}),
                      "read_per_token": computed // vocab if p["embedding"] else device})
    kv_token = data["kv_cache"]["bytes_per_token"]
    read = sum(p["read_per_token"] for p in parts)
    kv_full = kv_token * data["context_length"]
    return {
        "weights_counted_from": source,
        "parts": parts,
        "weight_bytes": sum(p["onnx_data_bytes"] for p in parts),
        "device_weight_bytes": sum(p["device_bytes"] for p in parts),
        "weight_bytes_read_per_token": read,
        "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes_full_context": kv_full,
        "bytes_per_token_full_context": read + kv_full,
    }


def read_manifest(root: Path, verify: bool = True) -> Manifest:
    """Read and check ``root/manifest.json``.

    Raises:
        UserError: no manifest, invalid JSON, an unknown schema or version, a field that is
            missing or mistyped (:func:`validate_manifest`), or (``verify``) a
            file that is missing or whose sha256 no longer matches (files unchanged since their
            hash last matched are not hashed again, see :func:`verify_files`).
    """
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: not a bundle (no {MANIFEST}); create one with `qwen-ondevice export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path}: unknown manifest schema {data.get('schema')!r} version {data.get('schema_version')!r} "
            f"(this qwen-ondevice reads {SCHEMA} version {SCHEMA_VERSION}); re-export the bundle"
        )
    m = Manifest(root, data, validate_manifest(data, str(path)))
    if verify:
        bad = verify_files(m, trust_cache=True)
        if bad:
            raise UserError(f"{root}: {len(bad)} file(s) fail their sha256 or are missing: {', '.join(bad[:5])}; re-export the bundle")
    return m


#: Files whose sha256 matched, keyed by absolute path: (size, mtime_ns, sha256), in the user's
#: cache folder. Opening a bundle re-hashes only files changed since (a Qwen2-7B bundle is
#: several GB); ``inspect`` and ``verify`` always hash everything.
VERIFIED_FILE = "verified_files.json"


def verify_files(m: Manifest, trust_cache: bool = False) -> list[str]:
    """Relative paths of manifest files that are missing or whose sha256 differs.

    ``trust_cache``: skip hashing a file whose size and modification time (ns) are those of a
    hash that matched before (:data:`VERIFIED_FILE`); a file written since is hashed again."""
    record_path = cache_dir() / VERIFIED_FILE
    try:
        record = json.loads(record_path.read_text()) if trust_cache else {}
    except (OSError, json.JSONDecodeError):
        record = {}
    bad, fresh = [], {}
    for rel, info in m.data["files"].items():
        p = m.root / rel
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            bad.append(rel)
            continue
        st = p.stat()
        key, stamp = str(p.resolve()), [st.st_size, st.st_mtime_ns, info["sha256"]]
        if trust_cache and record.get(key) == stamp:
            continue
        if sha256_file(p) != info["sha256"]:
            bad.append(rel)
        else:
            fresh[key] = stamp
    if fresh:
        try:
            old = json.loads(record_path.read_text()) if record_path.exists() else {}
        except (OSError, json.JSONDecodeError):
            old = {}
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            kept = {k: v for k, v in old.items() if os.path.exists(k)}  # forget deleted bundles
            write_json(record_path, {**kept, **fresh})
        except OSError:
            pass  # a read-only cache only costs the next open a re-hash
    return bad
