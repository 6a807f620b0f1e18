"""Open whatever MODEL the user names as an engine plus tokenizer, choosing the backend."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_ondevice.core.bundle import read_manifest
from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.tokenizer import Tokenizer
from qwen_ondevice.runtime.backends.ort_backend import OrtBackend
from qwen_ondevice.runtime.backends.qnn_backend import QnnBackend
from qwen_ondevice.runtime.engine import Engine

BACKENDS = ("torch", "ort-cpu", "qnn-htp")


@dataclass
class Runtime:
    """An engine over one backend, the tokenizer, and a name for the model (for the server)."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def open_runtime(model: str, backend: str | None = None, context_length: int = 4096, prompt_length: int | None = None,
                 host_numerics: str = "exact", float_activations: str | None = None) -> Runtime:
    """MODEL (bundle folder, checkpoint folder, .gguf, ``demo``, Hub id) -> :class:`Runtime`.

    A bundle runs on ``ort-cpu`` unless ``backend`` says otherwise; a checkpoint runs on ``torch``
    with the given context length (a bundle's context length is fixed by its graphs).
    ``host_numerics`` (``exact`` / ``fast``, see ``runtime.backends.ort_backend.HOST_NUMERICS``) applies
    to a bundle on ``ort-cpu`` only, and so does ``float_activations`` (a diagnostic regular
    expression, see ``runtime.backends.host_graph.float_activations``).

    Raises:
        UserError: unknown backend, a backend that cannot run this MODEL, ``fast`` numerics
            anywhere but a bundle on ort-cpu, or a bad MODEL.
    """
    if backend is not None and backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if host_numerics != "exact" and (not is_bundle(model) or backend not in (None, "ort-cpu")):
        raise UserError(f"--host-numerics {host_numerics} applies to a bundle on the ort-cpu backend; "
                        f"{model} runs on {backend or 'torch'} with its own numerics")
    if float_activations and (not is_bundle(model) or backend not in (None, "ort-cpu")):
        raise UserError(f"--float-activations applies to a bundle on the ort-cpu backend, not {model} on {backend or 'torch'}")
    if is_bundle(model):
        return open_bundle_runtime(Path(model), backend or "ort-cpu", host_numerics, float_activations)
    if backend not in (None, "torch"):
        raise UserError(f"backend {backend!r} runs an exported bundle; {model} is a checkpoint (use --backend torch or export it first)")
    from qwen_ondevice.runtime.backends.torch_backend import TorchBackend

    ckpt = load_checkpoint(model)
    if context_length > ckpt.config.max_position_embeddings:
        raise UserError(
            f"context length {context_length} exceeds the checkpoint's max_position_embeddings {ckpt.config.max_position_embeddings}"
        )
    tok = ckpt.load_tokenizer()
    if prompt_length is None:
        prompt_length = min(128, max(1, context_length // 2))
    engine = Engine(TorchBackend(ckpt, context_length=context_length), prompt_length=prompt_length)
    return Runtime(engine=engine, tokenizer=tok, model_name=Path(str(model)).name or str(model))


def open_bundle_runtime(root: Path, backend: str, host_numerics: str = "exact", float_activations: str | None = None) -> Runtime:
    """A :class:`~qwen_ondevice.runtime.open_model.Runtime` over a bundle on ``ort-cpu`` (with
    ``host_numerics``, see ``runtime.backends.ort_backend.HOST_NUMERICS``) or ``qnn-htp``.

    Raises:
        UserError: a bad bundle (see :func:`read_manifest`), or a backend it cannot run.
    """
    m = read_manifest(root)
    if backend == "torch":
        raise UserError("the torch backend runs a checkpoint, not a bundle; pass the checkpoint folder or use --backend ort-cpu")
    if backend == "ort-cpu":
        be = OrtBackend(m, numerics=host_numerics, float_pattern=float_activations)
    elif backend == "qnn-htp":
        be = QnnBackend(m)
    else:
        raise UserError(f"backend {backend!r} is not available for this bundle yet")
    cfg = m.config
    gen = json.loads((root / "generation_config.json").read_text()) if (root / "generation_config.json").exists() else {}
    tok = Tokenizer.from_folder(root, cfg, gen)
    engine = Engine(be, prompt_length=max(m.ar_lengths), mask_value=float(m.data["mask_value"]))
    return Runtime(engine=engine, tokenizer=tok, model_name=root.name)
