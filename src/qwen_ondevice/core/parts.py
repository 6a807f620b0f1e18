"""What each part of the split model holds: its checkpoint weights, the names of the tensors
that join the parts, the attention mask value of the graph contract.

Plain data, no torch: the export plans and builds parts from it, the runtime reads it back from
a bundle's manifest (docs/graph-contract.md).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Additive mask value for positions a query must not see. Finite (so a uint16 encoding of the
#: mask stays fine-grained) and far below any attention score seen on Qwen2.
MASK_VALUE = -1.0e4


def layer_weight_names(layer: int) -> dict[str, str]:
    """Checkpoint tensor names of decoder layer ``layer``, keyed by their short role."""
    p = f"model.layers.{layer}."
    return {
        "input_layernorm": p + "input_layernorm.weight",
        "q_proj.weight": p + "self_attn.q_proj.weight",
        "q_proj.bias": p + "self_attn.q_proj.bias",
        "k_proj.weight": p + "self_attn.k_proj.weight",
        "k_proj.bias": p + "self_attn.k_proj.bias",
        "v_proj.weight": p + "self_attn.v_proj.weight",
        "v_proj.bias": p + "self_attn.v_proj.bias",
        "o_proj.weight": p + "self_attn.o_proj.weight",
        "post_attention_layernorm": p + "post_attention_layernorm.weight",
        "gate_proj.weight": p + "mlp.gate_proj.weight",
        "up_proj.weight": p + "mlp.up_proj.weight",
        "down_proj.weight": p + "mlp.down_proj.weight",
    }



def hidden_state_name(layer: int) -> str:
    """The name of the part-boundary tensor that enters decoder layer ``layer`` (1, AR, H):
    ``hidden_states_{layer}``, numbered as transformers' ``output_hidden_states`` (0 is the
    embedding output). The producing part's output and the consuming part's input carry this one
    name and one encoding: Genie joins the parts of a bundle by identical tensor names and
    zero-fills an input no other graph produces."""
    return f"hidden_states_{layer}"


@dataclass(frozen=True)
class PartSpec:
    """What one part of the split model holds.

    index is 1-based (``part_{index}_of_{num_parts}``); ``layers`` is a range of decoder layers;
    ``embedding``/``head`` say whether the part holds the embedding table / final norm + lm_head.
    """

    index: int
    num_parts: int
    layers: range
    embedding: bool = False
    head: bool = False

    @property
    def name(self) -> str:
        return f"part_{self.index}_of_{self.num_parts}"

    @property
    def hidden_in(self) -> str | None:
        """The boundary tensor this part reads (None for the embedding part)."""
        return None if self.embedding else hidden_state_name(self.layers.start)

    @property
    def hidden_out(self) -> str | None:
        """The boundary tensor this part writes (None for the part with the lm_head)."""
        return None if self.head else hidden_state_name(self.layers.stop)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "layers": [self.layers.start, self.layers.stop],
            "embedding": self.embedding,
            "head": self.head,
        }

    @classmethod
    def from_dict(cls, d: dict, num_parts: int) -> "PartSpec":
        return cls(d["index"], num_parts, range(*d["layers"]), d["embedding"], d["head"])


def key_offset_name(layer: int) -> str:
    """The initializer (KVH, 1, 1, D) added to the layer's keys after RoPE (``key_center``): minus
    the key center c."""
    return f"model.layers.{layer}.self_attn.key_offset"
