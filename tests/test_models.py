"""Loading models through mlx-lm: the MLX model computes what the checkpoint's own torch model computes."""

import json

import mlx.core as mx
import numpy as np

import tiny_models
from mlx_dpo.models import load_model


def test_rope_theta_saved_by_transformers_5(tmp_path):
    """transformers >= 5 writes RoPE's base only inside `rope_parameters`; mlx-lm's Llama reads the
    top-level `rope_theta` and would fall back to 10000 (SmolLM2's is 100000: ~1-2 nats per sequence)."""
    import torch

    torch_model = tiny_models.build_llama(tmp_path, rope_theta=100000.0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    ids = list(range(3, 60))
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(load_model(tmp_path)(mx.array([ids]))[0])
    assert np.abs(ours - expected).max() < 1e-4
