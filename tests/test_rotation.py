"""The residual-stream rotation (quantize/rotation.py) is exact in float: transformers' own logits
of the rotated checkpoint equal those of the original, and the rotated weights are new."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_ondevice.quantize.rotation import random_orthogonal, rotate_checkpoint


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(64, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(64, seed=3))
    assert not np.allclose(q, random_orthogonal(64, seed=4))


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_checkpoint_computes_the_same_logits(tmp_path, tiny_factory, tied):
    from transformers import Qwen2ForCausalLM

    src = tiny_factory(tied=tied)
    dst = rotate_checkpoint(src, tmp_path / "rotated", seed=0)
    a = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = Qwen2ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 3838, 374, 220, 17, 10, 17, 30]])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        ha = a(ids, output_hidden_states=True).hidden_states[2]
        hb = b(ids, output_hidden_states=True).hidden_states[2]
    # float32 rounding of products over H = 64 terms, logits of order 1-10
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4), (la - lb).abs().max()
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    # the residual stream itself is rotated, not equal
    q = torch.from_numpy(random_orthogonal(ha.shape[-1], seed=0)).float()
    assert torch.allclose(ha @ q, hb, atol=1e-4)
    assert not torch.allclose(ha, hb, atol=1e-2)
    w_a = a.model.layers[0].mlp.down_proj.weight
    w_b = b.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w_a, w_b, atol=1e-3)
    assert torch.equal(b.model.norm.weight, torch.ones_like(b.model.norm.weight))
    assert b.config.tie_word_embeddings is False


def test_rotate_refuses_a_non_empty_destination(tmp_path, tiny_path):
    from qwen_ondevice.core.errors import UserError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        rotate_checkpoint(tiny_path, tmp_path / "x", seed=0)
    assert (tmp_path / "x" / "f").read_text() == "keep"
