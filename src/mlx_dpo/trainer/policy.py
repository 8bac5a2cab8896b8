"""The policy to train: mlx-lm's LoRA/DoRA layers, or the last blocks unfrozen for full tuning."""

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from .config import TrainConfig


def prepare_policy(model: nn.Module, cfg: TrainConfig) -> int:
    """Freeze the model, make the chosen part trainable; returns the trainable parameter count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if cfg.num_layers > len(model.layers):
        raise UserError(f"--num-layers {cfg.num_layers}: the model has only {len(model.layers)} layers")
    model.freeze()
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0):]:  # -1 -> [-0:] -> all layers
            layer.unfreeze()
    else:
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
        linear_to_lora_layers(model, cfg.num_layers, lora, use_dora=cfg.fine_tune_type == "dora")
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # mlx-lm's: patches the block class, so every block recomputes
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
