"""Part planning: split the model into parts by weight bytes (docs/graph-contract.md).

Part 1 holds the embedding table alone; the decoder layers are cut into contiguous ranges whose
byte sizes are balanced (the last range also carries the final norm and the lm_head).
"""

from __future__ import annotations

from qwen_ondevice.core.checkpoint import WeightStore
from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.parts import PartSpec, layer_weight_names

#: Bytes per weight element of each precision: (decoder projections, embedding and lm_head).
#: Norms and biases stay 32-bit float in the quantized precisions (tiny).
PRECISION_BYTES = {
    "fp32": (4.0, 4.0),
    "fp16": (2.0, 2.0),
    "w8a16": (1.0, 1.0),
    "w4a16": (0.5, 1.0),
}

#: Default cap on a part's weight bytes: keeps each compiled context binary well under the
#: HTP's ~2 GB graph limit (docs/graph-contract.md); Qwen2-7B at w4a16 then splits into 5 parts.
DEFAULT_MAX_PART_BYTES = 1 << 30


def layer_bytes(cfg: ModelConfig, precision: str) -> int:
    """Weight bytes of one decoder layer at ``precision`` (projections, biases, norms)."""
    proj_bpe, _ = PRECISION_BYTES[precision]
    small_bpe = 4.0 if precision in ("w8a16", "w4a16", "fp32") else 2.0
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    proj = H * q + 2 * H * kv + q * H + 3 * H * I
    small = q + 2 * kv + 2 * H  # biases and the two norms
    return int(proj * proj_bpe + small * small_bpe)


def embedding_bytes(cfg: ModelConfig, precision: str) -> int:
    return int(cfg.vocab_size * cfg.hidden_size * PRECISION_BYTES[precision][1])


def head_bytes(cfg: ModelConfig, precision: str) -> int:
    return int(cfg.vocab_size * cfg.hidden_size * PRECISION_BYTES[precision][1] + cfg.hidden_size * 4)


def plan_parts(
    cfg: ModelConfig, precision: str, num_parts: int | None = None, max_part_bytes: int | None = None
) -> list[PartSpec]:
    """Choose the parts: embedding first, then balanced contiguous layer ranges.

    Give ``num_parts`` (total parts, >= 2) or ``max_part_bytes`` (the smallest number of decoder
    parts whose largest part fits is chosen); by default ``DEFAULT_MAX_PART_BYTES``.
    The layer ranges minimise the largest part's bytes (linear partition by dynamic programming).

    Raises:
        UserError: num_parts < 2 or more decoder parts than layers; a single layer (or the
            embedding) larger than max_part_bytes.
    """
    L = cfg.num_hidden_layers
    sizes = [layer_bytes(cfg, precision)] * L
    head = head_bytes(cfg, precision)
    if num_parts is not None:
        if num_parts < 2 or num_parts - 1 > L:
            raise UserError(f"--num-parts must be between 2 and {L + 1} for a {L}-layer model, got {num_parts}")
        ranges = _balanced_ranges(sizes, head, num_parts - 1)
    else:
        cap = max_part_bytes or DEFAULT_MAX_PART_BYTES
        if embedding_bytes(cfg, precision) > cap or sizes[0] > cap:
            raise UserError(f"--max-part-bytes {cap} is smaller than one layer or the embedding table; raise it")
        for k in range(1, L + 1):
            ranges = _balanced_ranges(sizes, head, k)
            if max(_range_bytes(r, sizes, head, L) for r in ranges) <= cap:
                break
    n = len(ranges) + 1
    parts = [PartSpec(1, n, range(0, 0), embedding=True)]
    for i, r in enumerate(ranges):
        parts.append(PartSpec(i + 2, n, r, head=(r.stop == L)))
    return parts


def part_bytes(cfg: ModelConfig, precision: str, part: PartSpec) -> int:
    """Weight bytes of one part at ``precision``."""
    if part.embedding:
        return embedding_bytes(cfg, precision)
    return len(part.layers) * layer_bytes(cfg, precision) + (head_bytes(cfg, precision) if part.head else 0)


def _range_bytes(r: range, sizes: list[int], head: int, L: int) -> int:
    return sum(sizes[r.start : r.stop]) + (head if r.stop == L else 0)


def _balanced_ranges(sizes: list[int], head: int, k: int) -> list[range]:
    """Split layers into k contiguous ranges minimising the largest range's bytes."""
    L = len(sizes)
    cost = [s for s in sizes]
    cost[-1] += head  # the last range carries the head
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[j][i]: minimal max-bytes splitting the first i layers into j ranges
    best = [[INF] * (L + 1) for _ in range(k + 1)]
    cut = [[0] * (L + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, L + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    ranges, i = [], L
    for j in range(k, 0, -1):
        s = cut[j][i]
        ranges.append(range(s, i))
        i = s
    return ranges[::-1]


def plan_reason(cfg: ModelConfig, precision: str, parts: list[PartSpec], num_parts: int | None = None,
                max_part_bytes: int | None = None) -> str:
    """Why the plan has its number of parts, in one sentence (printed by the export and kept in
    the manifest's ``plan``)."""
    if num_parts is not None:
        return f"{len(parts)} parts as asked (--num-parts)"
    cap = max_part_bytes or DEFAULT_MAX_PART_BYTES
    L = cfg.num_hidden_layers
    largest = max(part_bytes(cfg, precision, p) for p in parts[1:])
    why = (f"{len(parts)} parts: the fewest whose largest part stays within the cap of {cap / 2**30:.2f} GiB of weights "
           f"({'--max-part-bytes' if max_part_bytes else 'the default'}; largest part {largest / 1e6:.0f} MB")
    if len(parts) > 2:
        sizes = [layer_bytes(cfg, precision)] * L
        fewer = max(_range_bytes(r, sizes, head_bytes(cfg, precision), L) for r in _balanced_ranges(sizes, head_bytes(cfg, precision), len(parts) - 2))
        why += f", where {len(parts) - 1} parts would need {fewer / 1e6:.0f} MB"
    return why + ("). The cap keeps every context binary far below the HTP's limit of about 2 GB of estimated "
                  "allocation per graph, and the compile's memory, which grows with the part's parameters, within "
                  "a 24 GB machine")


def describe_plan(cfg: ModelConfig, precision: str, parts: list[PartSpec]) -> str:
    """A human-readable table of the plan (one line per part, bytes in MB)."""
    lines = []
    for p in parts:
        what = "embedding" if p.embedding else f"layers {p.layers.start}-{p.layers.stop - 1}" + (" + norm + lm_head" if p.head else "")
        lines.append(f"  {p.name}: {what:<34} {part_bytes(cfg, precision, p) / 1e6:9.1f} MB")
    return "\n".join(lines)


def check_weights_present(weights: WeightStore, cfg: ModelConfig) -> None:
    """Fail early, naming the first missing tensor, before any part is written."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(cfg.num_hidden_layers):
        names += list(layer_weight_names(l).values())
    for n in names:
        if n not in weights:
            raise UserError(f"checkpoint has no tensor {n!r}; is this a complete Qwen2 checkpoint?")
