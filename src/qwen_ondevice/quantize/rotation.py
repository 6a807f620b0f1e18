"""An orthogonal rotation of the residual stream folded into a Qwen2 checkpoint, exact in float.

With ``Q`` (H, H) orthogonal, the rotated model carries ``h' = h Q`` wherever the original carries
the residual stream ``h`` (1, L, H). RMSNorm commutes with it (``rms(h Q) = rms(h)``) once its gain
``g`` is folded into the projections it feeds, so the rotated model computes the same logits
(QuaRot, Ashkboos et al. 2024, section 3; SliceGPT, Ashkboos et al. 2024, computational
invariance). In the checkpoint's (out, in) layout, ``y = x W^T``:

- ``embed_tokens`` (V, H): ``E Q``;
- q/k/v_proj and gate/up_proj (N, H), fed by a norm with gain ``g``: ``W diag(g) Q``, the norm's
  gain set to ones (biases stay: they act on the outputs);
- o_proj and down_proj (H, K), writing into the residual stream: ``Q^T W``;
- lm_head (V, H), fed by the final norm: ``W diag(g_final) Q`` (a tied lm_head becomes untied:
  the embedding gets ``E Q`` and the head ``E diag(g) Q``).

With ``heads``, each attention head's values are rotated too, by ``R`` (d, d) orthogonal, the same
for every head (QuaRot's offline head rotation; SpinQuant's R2): v_proj's rows of head j become
``R^T W_j`` and its bias ``b_j R``, so the value cache holds ``v R``; attention mixes positions,
not channels, so each head's output is ``o R``, and o_proj's columns of head j become ``W_j R``.
``R`` is the Sylvester Hadamard matrix over sqrt(d) where d is a power of two (Qwen2's 64 and
128), a Haar-random one otherwise. It spreads a head's outlier value channels over all d.

Every weight is then a mix of H original rows or columns, so a checkpoint that came from a block
quantized file (the demo's Q4_K_M GGUF) no longer sits on that file's 4-bit grid: this is how the
project makes a test model whose weights do not flatter block-wise int4 (``benchmarks/
make_offgrid_model.py``). Both rotations spread the residual stream's outlier channels over all H
channels, which also changes what activation quantization sees.

:class:`RotatedWeights` applies the same rotation while an export reads the checkpoint
(``export --rotate``), one tensor at a time, so nothing is written or held twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from qwen_ondevice.core.errors import UserError

#: The seed of the rotation ``export --rotate`` folds in (the one of benchmarks/make_offgrid_model.py).
ROTATION_SEED = 0
#: Files copied unchanged from the source folder (everything but the weights).
_KEEP_SUFFIXES = (".json", ".jinja", ".txt", ".model")


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (n, n) float64 from ``numpy.random.default_rng(seed)``:
    the Q of a QR decomposition of a standard normal matrix, its columns' signs fixed by R's
    diagonal (Mezzadri 2007, "How to generate random matrices from the classical compact groups",
    section 5)."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def head_rotation(d: int, seed: int) -> np.ndarray:
    """The per-head rotation R (d, d) float64: the Sylvester Hadamard matrix scaled by 1/sqrt(d)
    when d is a power of two (symmetric, orthogonal; Sylvester 1867), else
    :func:`random_orthogonal` (d, seed + 1)."""
    if d & (d - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        return h / np.sqrt(d)
    return random_orthogonal(d, seed + 1)


def rotate_state_dict(tensors: dict[str, np.ndarray], num_layers: int, q: np.ndarray,
                      tied: bool) -> dict[str, np.ndarray]:
    """The rotated tensors of a Qwen2ForCausalLM state dict (names as in transformers).

    tensors: name -> array (float32/float64; norms (H,), projections (out, in)); q: (H, H)
    orthogonal. Arithmetic in float64, results in each tensor's own dtype. A tied checkpoint
    (no ``lm_head.weight``) gets one, rotated from the embedding.

    Raises:
        UserError: a tensor the rotation needs is missing, or ``q`` does not match the hidden size.
    """
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"cannot rotate the checkpoint: it has no {name}")
        return tensors[name]

    emb = get("model.embed_tokens.weight")
    H = emb.shape[1]
    if q.shape != (H, H):
        raise UserError(f"rotation of shape {q.shape} does not match the hidden size {H}")
    out = dict(tensors)

    def fold_in(name: str, gain: np.ndarray, src: str | None = None) -> None:  # W diag(g) Q
        w = get(src or name)
        out[name] = ((w.astype(np.float64) * gain[None, :]) @ q).astype(w.dtype)

    def fold_out(name: str) -> None:  # Q^T W
        w = get(name)
        out[name] = (q.T @ w.astype(np.float64)).astype(w.dtype)

    out["model.embed_tokens.weight"] = (emb.astype(np.float64) @ q).astype(emb.dtype)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        for norm, projs in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            gain = get(p + norm + ".weight").astype(np.float64)
            for proj in projs:
                fold_in(p + proj + ".weight", gain)
            out[p + norm + ".weight"] = np.ones_like(get(p + norm + ".weight"))
        fold_out(p + "self_attn.o_proj.weight")
        fold_out(p + "mlp.down_proj.weight")
    gain = get("model.norm.weight").astype(np.float64)
    fold_in("lm_head.weight", gain, src="model.embed_tokens.weight" if tied else None)
    out["model.norm.weight"] = np.ones_like(get("model.norm.weight"))
    return out


def rotate_checkpoint(src: Path, dst: Path, seed: int) -> Path:
    """Write ``dst``: the Hugging Face checkpoint ``src`` with its residual stream rotated by
    :func:`random_orthogonal` (H, seed), every other file copied. Holds the model twice in memory
    (the source tensors and the rotated ones): meant for small models such as the demo.

    Raises:
        UserError: ``src`` is not a Qwen2 checkpoint folder, or ``dst`` exists and is not empty.
    """
    from safetensors.numpy import load_file, save_file

    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json; pass a Hugging Face checkpoint folder")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; pass a new folder")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise UserError(f"{src}: model_type {config.get('model_type')!r}, expected 'qwen2'")
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in tensors
    q = random_orthogonal(config["hidden_size"], seed)
    rotated = rotate_state_dict(tensors, config["num_hidden_layers"], q, tied)
    del tensors
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in _KEEP_SUFFIXES and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(rotated, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


_NORMS = ("input_layernorm", "post_attention_layernorm")
_IN_SIDE = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
            "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
            "mlp.up_proj": "post_attention_layernorm"}
_OUT_SIDE = ("self_attn.o_proj", "mlp.down_proj")


class RotatedWeights:
    """A read-only view of a checkpoint's weights (``core.checkpoint.WeightStore``) with the
    residual stream rotated by :func:`random_orthogonal` (H, ``seed``), computed per tensor as it
    is read (float32 products, so logits match the original within float32 rounding): the rules
    of the module docstring. Memory: the tensor, its rotated copy and Q (H x H float32).
    """

    def __init__(self, store, hidden_size: int, seed: int, head_dim: int | None = None):
        """head_dim: also rotate each head's values by :func:`head_rotation` (head_dim, seed);
        None rotates the residual stream only."""
        import torch

        self.store = store
        self.seed = seed
        self.q = torch.from_numpy(random_orthogonal(hidden_size, seed).astype(np.float32))
        self.r = None if head_dim is None else torch.from_numpy(head_rotation(head_dim, seed).astype(np.float32))

    def names(self) -> list[str]:
        return self.store.names()

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def nbytes(self, name: str, bytes_per_element: int) -> int:
        return self.store.nbytes(name, bytes_per_element)

    def release(self) -> None:
        self.store.release()

    def get(self, name: str, dtype=None):
        """The rotated tensor ``name`` as ``dtype`` (default float32).

        Raises:
            UserError: the checkpoint lacks ``name`` or a norm it needs.
        """
        out = self._rotated(name)
        return out if dtype is None else out.to(dtype)

    def _rotated(self, name: str):
        out = self._residual_rotated(name)
        if self.r is None or ".self_attn." not in name:
            return out
        d = self.r.shape[0]
        if name.endswith("v_proj.weight"):  # rows of head j: R^T W_j
            n, h = out.shape
            return (self.r.T @ out.reshape(n // d, d, h)).reshape(n, h)
        if name.endswith("v_proj.bias"):  # b_j R
            return (out.reshape(-1, d) @ self.r).reshape(-1)
        if name.endswith("o_proj.weight"):  # columns of head j: W_j R
            h, n = out.shape
            return (out.reshape(h, n // d, d) @ self.r).reshape(h, n)
        return out

    def _residual_rotated(self, name: str):
        import torch

        get = self.store.get
        if name == "model.norm.weight" or any(name.endswith(f".{n}.weight") for n in _NORMS):
            return torch.ones_like(get(name))
        if name == "model.embed_tokens.weight":
            return get(name) @ self.q
        if name == "lm_head.weight":
            return (get(name) * get("model.norm.weight")[None, :]) @ self.q
        if name.startswith("model.layers.") and name.endswith(".weight"):
            prefix, _, rest = name[len("model.layers."):].partition(".")
            proj = rest[: -len(".weight")]
            if proj in _IN_SIDE:
                gain = get(f"model.layers.{prefix}.{_IN_SIDE[proj]}.weight")
                return (get(name) * gain[None, :]) @ self.q
            if proj in _OUT_SIDE:
                return self.q.T @ get(name)
        return get(name)  # biases
