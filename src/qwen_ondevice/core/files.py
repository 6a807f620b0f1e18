"""Where the project keeps its cache, and the digest every stage checks files with."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Cache root: ``$QWEN_ONDEVICE_CACHE``, else the user's cache dir (``~/.cache/qwen-ondevice``)."""
    env = os.environ.get("QWEN_ONDEVICE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("qwen-ondevice"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
