"""The ``torch`` backend: the adapted float graph of :mod:`qwen_ondevice.core.modeling`, any AR."""

from __future__ import annotations

import numpy as np
import torch

from qwen_ondevice.core.checkpoint import Checkpoint
from qwen_ondevice.core.modeling import DecoderLayer, DecoderPart, EmbeddingPart, RMSNorm
from qwen_ondevice.runtime.engine import Backend, KVCache

#: lm_head rows converted to the compute dtype at a time by the streaming backend (Qwen2-7B's
#: lm_head is 152064 x 3584: 2.2 GB in float32 at once, 0.23 GB per block of this many rows).
HEAD_ROWS_PER_BLOCK = 16384


class TorchBackend(Backend):
    """Float reference backend: the embedding part and one decoder part holding every layer.

    dtype float32 (default) or bfloat16/float16; logits are returned as float32.

    ``stream=True`` holds no layer between calls: each call builds one decoder layer at a time
    from the memory-mapped checkpoint (and unmaps it), gathers only the embedding rows it needs and
    applies lm_head in row blocks, so memory stays near one layer in ``dtype`` whatever the depth
    (Qwen2-7B in float32: 30 GB held, about 1 GB streamed). Same arithmetic, far slower per call:
    meant for few long calls (perplexity windows), not token-by-token generation.
    """

    name = "torch"
    ar_lengths = None

    def __init__(self, checkpoint: Checkpoint, context_length: int = 4096, dtype: torch.dtype = torch.float32,
                 stream: bool = False):
        self.config = checkpoint.config
        self.context_length = context_length
        self.dtype = dtype
        self.stream = stream
        self.weights = w = checkpoint.weights
        L = self.config.num_hidden_layers
        if not stream:
            self.embedding = EmbeddingPart(self.config, w, dtype).eval()
            self.decoder = DecoderPart(self.config, w, range(L), head=True, dtype=dtype).eval()

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, cos, sin, cache: KVCache, n_past, n_valid, last_only=False) -> np.ndarray:
        if self.stream:
            return self._forward_streamed(input_ids, attention_mask, cos, sin, cache, n_past, n_valid, last_only)
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

    @torch.inference_mode()
    def _forward_streamed(self, input_ids, attention_mask, cos, sin, cache: KVCache, n_past, n_valid, last_only) -> np.ndarray:
        AR = input_ids.shape[1]
        P = self.context_length - AR
        dt, w, cfg = self.dtype, self.weights, self.config
        ids = torch.from_numpy(input_ids).long()
        hidden = w.get("model.embed_tokens.weight")[ids].to(dt)  # (1, AR, H): only the rows used
        mask = torch.from_numpy(np.concatenate([attention_mask[..., :n_past], attention_mask[..., P:]], axis=-1)).to(dt)
        cos_t, sin_t = torch.from_numpy(cos).to(dt), torch.from_numpy(sin).to(dt)
        for l in range(cfg.num_hidden_layers):
            layer = DecoderLayer(cfg, w, l, dt)
            k, v = cache.past(l, n_past)
            hidden, nk, nv = layer(hidden, mask, cos_t, sin_t, torch.from_numpy(k).to(dt), torch.from_numpy(v).to(dt))
            cache.write(l, n_past, nk.float().numpy(), nv.float().numpy(), n_valid)
            del layer
            w.release()
        rows = hidden[:, n_valid - 1 : n_valid] if last_only else hidden[:, :n_valid]
        x = RMSNorm(w.get("model.norm.weight").to(dt), cfg.rms_norm_eps)(rows)[0]  # (N, H)
        head = w.get("lm_head.weight")  # (V, H) as stored
        logits = np.empty((x.shape[0], head.shape[0]), np.float32)
        for r0 in range(0, head.shape[0], HEAD_ROWS_PER_BLOCK):
            block = head[r0 : r0 + HEAD_ROWS_PER_BLOCK].to(dt)
            logits[:, r0 : r0 + block.shape[0]] = torch.nn.functional.linear(x, block).float().numpy()
        w.release()
        return logits
