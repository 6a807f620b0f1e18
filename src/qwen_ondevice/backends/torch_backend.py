"""The ``torch`` backend: the adapted float graph of :mod:`qwen_ondevice.modeling`, any AR."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..engine import Backend, KVCache
from ..modeling import DecoderPart, EmbeddingPart


class TorchBackend(Backend):
    """Float reference backend: the embedding part and one decoder part holding every layer.

    dtype float32 (default) or bfloat16/float16; logits are returned as float32.
    """

    name = "torch"
    ar_lengths = None

    def __init__(self, checkpoint: Checkpoint, context_length: int = 4096, dtype: torch.dtype = torch.float32):
        self.config = checkpoint.config
        self.context_length = context_length
        self.dtype = dtype
        w = checkpoint.weights
        L = self.config.num_hidden_layers
        self.embedding = EmbeddingPart(self.config, w, dtype).eval()
        self.decoder = DecoderPart(self.config, w, range(L), head=True, dtype=dtype).eval()

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, cos, sin, cache: KVCache, n_past, n_valid, last_only=False) -> np.ndarray:
        AR = input_ids.shape[1]
        P = self.context_length - AR
        dt = self.dtype
        hidden = self.embedding(torch.from_numpy(input_ids))  # (1, AR, H)
        # Only the n_past filled slots can be visible, so the float reference attends over those
        # alone (the masked slots would add exactly zero): same result, transformers-like speed.
        past = [cache.past(l, n_past) for l in range(self.config.num_hidden_layers)]
        mask = np.concatenate([attention_mask[..., :n_past], attention_mask[..., P:]], axis=-1)
        hidden, new_k, new_v = self.decoder.layers_forward(
            hidden,
            torch.from_numpy(mask).to(dt),
            torch.from_numpy(cos).to(dt),
            torch.from_numpy(sin).to(dt),
            [torch.from_numpy(k).to(dt) for k, _ in past],
            [torch.from_numpy(v).to(dt) for _, v in past],
        )
        for l, (k, v) in enumerate(zip(new_k, new_v)):
            cache.write(l, n_past, k.float().numpy(), v.float().numpy(), n_valid)
        rows = hidden[:, n_valid - 1 : n_valid] if last_only else hidden[:, :n_valid]
        return self.decoder.head_forward(rows)[0].float().numpy()
