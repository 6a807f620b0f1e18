"""A GGUF file as MODEL: checked to be Qwen2, then converted once into a Hugging Face folder in the
user's cache (dequantized to fp32 safetensors), so later loads are memory maps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from qwen_ondevice.core.files import cache_dir
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.progress import log


def gguf_to_folder(gguf: Path, key: str | None = None) -> Path:
    """Convert a GGUF once into a Hugging Face folder in the cache (fp32 safetensors); returns it.

    Dequantizing a GGUF through ``transformers`` takes tens of seconds; the folder makes every
    later load a memory map. The conversion writes to a temporary folder and renames it when
    complete, so an interrupted conversion is redone rather than half-used; the temporary folder
    is this process's own, so two processes converting at once (an export and a test run started
    together on a fresh machine) both succeed and the first rename wins.
    """
    st = gguf.stat()
    if key is None:
        ident = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
        key = f"{gguf.stem}-{hashlib.sha256(ident).hexdigest()[:12]}"
    out = cache_dir() / "hf" / key
    if (out / "config.json").exists():
        return out
    check_gguf_architecture(gguf)
    log(f"converting {gguf.name} to a Hugging Face folder in {out} (once; dequantizes to fp32)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise UserError(f"{gguf}: cannot load this GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    # transformers refuses save_pretrained on a GGUF-loaded model; write the dequantized tensors
    # and the config ourselves (the config without its GGUF quantization block).
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    del model
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_gguf_architecture(gguf: Path) -> None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf), "r")
        field_ = reader.fields.get("general.architecture")
        arch = bytes(field_.parts[field_.data[0]]).decode() if field_ else None
    except Exception as e:
        raise UserError(f"{gguf}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    if arch != "qwen2":
        raise UserError(f"{gguf}: GGUF architecture is {arch!r}, not 'qwen2'; qwen-ondevice only converts Qwen2 models")
