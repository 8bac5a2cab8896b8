"""The optimizer: torch.optim.AdamW's numbers, and the learning rate a report names is the one its step used."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_dpo.cli import cli
from mlx_dpo.trainer.config import TrainConfig
from mlx_dpo.trainer.run import build_optimizer


def test_adamw_equals_torch_adamw_on_the_same_gradients():
    """The same 12 gradients into mlx-dpo's optimizer and torch.optim.AdamW (defaults, bias correction
    on): the weights after every step agree to float32 rounding. mlx's default (no bias correction)
    takes ~3x larger steps early on and fails this at step 1."""
    import torch

    cfg = TrainConfig(cache="c", model="m", output="o", learning_rate=5e-3, weight_decay=0.05,
                      lr_schedule="constant", iters=12)
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    ours = build_optimizer(cfg)
    params = {k: mx.array(v) for k, v in start.items()}
    theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    torch_opt = torch.optim.AdamW(list(theirs.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    for step in range(1, 13):
        grads = {k: rng.normal(scale=10.0 ** rng.integers(-4, 2), size=v.shape).astype(np.float32)
                 for k, v in start.items()}
        params = ours.apply_gradients({k: mx.array(g) for k, g in grads.items()}, params)
        mx.eval(params)
        for k, g in grads.items():
            theirs[k].grad = torch.tensor(g)
        torch_opt.step()
        for k in start:
            np.testing.assert_allclose(np.array(params[k]), theirs[k].detach().numpy(), rtol=2e-6, atol=1e-7,
                                       err_msg=f"step {step}, {k}")


def test_reported_learning_rate_is_the_one_the_step_used(standard_cache, tiny_model_dir, tmp_path):
    """Warmup over 3 steps, then constant: step s updates with min(s-1, 3)/3 x peak (mlx's linear_schedule,
    as transformers' warmup). Step 1 takes rate 0, seen in its adapters: LoRA's B matrices are still 0."""
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", standard_cache, "--model", tiny_model_dir, "--output", out, "--iters", 5,
        "--learning-rate", 3e-3, "--warmup-steps", 3, "--lr-schedule", "constant", "--steps-per-report", 1,
        "--steps-per-save", 1, "--batch-size", 2]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reported = [r["learning_rate"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["split"] == "train"]
    assert reported == pytest.approx([0.0, 1e-3, 2e-3, 3e-3, 3e-3], rel=1e-6)
    lora_b = lambda step: [v for k, v in mx.load(str(out / f"{step:07d}_adapters.safetensors")).items()  # noqa: E731
                           if k.endswith("lora_b")]
    assert all(mx.all(v == 0).item() for v in lora_b(1))
    assert any(mx.any(v != 0).item() for v in lora_b(2))
