"""Qwen2 model configuration, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_ondevice.core.errors import UserError

#: Architectures accepted: Qwen2 / Qwen2.5 checkpoints and their fine-tunes (DeepSeek-R1-Distill-Qwen).
QWEN2_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Qwen2 ``config.json`` that the on-device graph depends on.

    Names follow the checkpoint (``num_key_value_heads``...). Sizes are in elements; ``head_dim``
    is ``hidden_size // num_attention_heads`` (Qwen2 has no separate head_dim field).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_cache_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one token adds to the KV cache: a key and a value of (KVH, D) per layer, each
        element ``itemsize`` bytes (1 for the quantized bundles' uint8 cache)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def parameter_count(self) -> int:
        """Parameters of Qwen2ForCausalLM with this config: embedding, per layer q/k/v (with
        biases), o, gate/up/down and two norms, the final norm, and an untied lm_head."""
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        layer = H * H + H + 2 * (kv * H + kv) + H * H + 3 * H * I + 2 * H
        return V * H * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + H

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a ``config.json`` dict.

        Raises:
            UserError: the architecture is not Qwen2, or a required field is missing/inconsistent.
        """
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type != "qwen2" or (archs and not any(a in QWEN2_ARCHITECTURES for a in archs)):
            raise UserError(
                f"{source}: model_type={model_type!r}, architectures={archs!r} is not the Qwen2 "
                "architecture (model_type 'qwen2', Qwen2ForCausalLM); qwen-ondevice only converts Qwen2 checkpoints"
            )
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = (d.get("rope_parameters") or d.get("rope_scaling") or {}).get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rope_type not in ("default", None):
            raise UserError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
        try:
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except KeyError as e:
            raise UserError(f"{source}: required field {e.args[0]!r} is missing") from None
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UserError(f"{source}: hidden_size / attention heads / KV heads are inconsistent")
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise UserError(f"{source}: head_dim {d['head_dim']} != hidden_size/num_attention_heads")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no config.json; a checkpoint folder needs config.json") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)
