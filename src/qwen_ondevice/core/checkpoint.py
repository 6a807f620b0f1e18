"""Model loading: one function, :func:`load_checkpoint`, for whatever the user typed as MODEL.

Accepted: a Hugging Face checkpoint folder, a ``.gguf`` file, ``demo``, or a Hub id (only where the
Hub is reachable). Every input ends up as a Hugging Face folder (safetensors + config + tokenizer);
a GGUF is converted once into the cache (:mod:`qwen_ondevice.core.gguf_folder`) so later loads
are memory maps.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.demo import demo_gguf
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.gguf_folder import gguf_to_folder
from qwen_ondevice.core.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported where tensors are made: opening a bundle needs none of this
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


class WeightStore:
    """Read-only access to a checkpoint's tensors by name, memory-mapped from ``*.safetensors``.

    Tensors are returned as float32 torch tensors (converted on access); nothing is read from disk
    until a tensor is asked for, so a part of a 7B model can be processed without loading the rest.
    A tied checkpoint has no ``lm_head.weight``: it is served from ``model.embed_tokens.weight``.
    """

    def __init__(self, folder: Path, tie_word_embeddings: bool):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder}: no *.safetensors weights in this folder")
        check_shards(folder, files)
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            for k in self._handle(f).keys():
                self._where[k] = f
        self.tie_word_embeddings = tie_word_embeddings

    def _handle(self, f: Path):
        if f not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise UserError(f"{f}: cannot read safetensors file ({e})") from None
        return self._handles[f]

    def release(self) -> None:
        """Unmap the files (their pages stop counting in RSS); they reopen on the next access.

        Export calls this after each part, so the memory map of a 7B checkpoint never holds more
        than about one part's pages resident."""
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self._where)

    def _resolve(self, name: str) -> str:
        if name not in self._where and name == "lm_head.weight" and self.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) in self._where

    def get(self, name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The tensor ``name`` as ``dtype`` (default float32). Raises UserError when the checkpoint lacks it."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        key = self._resolve(name)
        if key not in self._where:
            raise UserError(f"checkpoint has no tensor {name!r}; is this a complete Qwen2 checkpoint?")
        return self._handle(self._where[key]).get_tensor(key).to(dtype)

    def nbytes(self, name: str, bytes_per_element: int) -> int:
        """Bytes of ``name`` at ``bytes_per_element`` (shape read from the header, no data read)."""
        key = self._resolve(name)
        shape = self._handle(self._where[key]).get_slice(key).get_shape()
        n = 1
        for s in shape:
            n *= s
        return n * bytes_per_element


SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_shards(folder: Path, files: list[Path]) -> None:
    """Check a checkpoint's weight files before any is read: every shard named in
    ``model.safetensors.index.json`` is there, and no file is shorter than its own header says
    (a truncated download or copy). Reads only the headers.

    Raises:
        UserError: one line naming the missing or truncated file.
    """
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        missing = [n for n in named if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder / missing[0]}: missing, but {SAFETENSORS_INDEX} names it"
                            + (f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else ""))
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 8 <= size and n <= size - 8 else None
        except (OSError, ValueError):
            header = None
        if header is None:
            raise UserError(f"{f}: not a safetensors file, or truncated in its header ({size} bytes)")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise UserError(f"{f}: truncated ({size} bytes; its header describes {8 + n + end}); copy or download it again")


@dataclass
class Checkpoint:
    """A Qwen2 checkpoint as a Hugging Face folder.

    Attributes:
        path: the folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
        config: the parsed model configuration.
        generation_config: ``generation_config.json`` as a dict ({} when absent).
        source: what the user typed (for messages and the manifest).
    """

    path: Path
    config: ModelConfig
    generation_config: dict = field(default_factory=dict)
    source: str = ""
    _weights: WeightStore | None = None

    @property
    def weights(self) -> WeightStore:
        if self._weights is None:
            self._weights = WeightStore(self.path, self.config.tie_word_embeddings)
        return self._weights

    def with_weights(self, store) -> "Checkpoint":
        """The same checkpoint reading its tensors from ``store`` (an object with WeightStore's
        ``names``, ``__contains__``, ``get``, ``nbytes`` and ``release``): how an export stage
        sees transformed weights (e.g. ``quantize.rotation.RotatedWeights``) without a copy."""
        return Checkpoint(path=self.path, config=self.config, generation_config=self.generation_config,
                          source=self.source, _weights=store)

    def load_tokenizer(self):
        """The checkpoint's own tokenizer (``transformers`` fast tokenizer with its chat template)."""
        return Tokenizer.from_folder(self.path, self.config, self.generation_config)

    def load_transformers_model(self):
        """The independent reference: ``transformers``' ``Qwen2ForCausalLM`` in fp32, eval mode."""
        import torch
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()


def load_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """Resolve MODEL (folder, ``.gguf`` file, ``demo`` or Hub id) to a :class:`Checkpoint`.

    Raises:
        UserError: the path does not exist, is not a Qwen2 checkpoint, has no weights or tokenizer,
            the GGUF cannot be read, the demo packages are missing, or the Hub is unreachable.
    """
    text = str(spec)
    if text == "demo":
        gguf = demo_gguf()
        folder = gguf_to_folder(gguf, key="demo-" + gguf.name)
        return _open_folder(folder, source="demo")
    path = Path(text).expanduser()
    if path.is_dir():
        return _open_folder(path, source=text)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path}: a file MODEL must be a .gguf file; otherwise pass a checkpoint folder")
        return _open_folder(gguf_to_folder(path), source=text)
    if _looks_like_hub_id(text):
        return _open_folder(_download_from_hub(text), source=text)
    raise UserError(f"{text}: no such file or folder (MODEL is a checkpoint folder, a .gguf file, 'demo' or a Hub id)")


def _open_folder(folder: Path, source: str) -> Checkpoint:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json; a checkpoint folder needs config.json, *.safetensors and tokenizer files")
    config = ModelConfig.from_file(folder / "config.json")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder}: no *.safetensors weights in this folder")
    missing = [f for f in TOKENIZER_FILES if not (folder / f).exists()]
    if missing:
        raise UserError(f"{folder}: missing {', '.join(missing)}; copy the tokenizer files next to config.json")
    gen = {}
    if (folder / "generation_config.json").exists():
        gen = json.loads((folder / "generation_config.json").read_text())
    return Checkpoint(path=folder, config=config, generation_config=gen, source=source)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(
            f"{repo_id}: no such local folder and the Hugging Face Hub is not reachable from this "
            "machine; download the checkpoint elsewhere and pass its local folder"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:
        raise UserError(f"{repo_id}: download from the Hub failed ({type(e).__name__}); pass a local folder") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
