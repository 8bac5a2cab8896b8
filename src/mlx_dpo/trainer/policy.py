"""The policy to train: mlx-lm's LoRA/DoRA layers, or the last blocks unfrozen for full tuning,
optionally on top of earlier adapters (--adapter-path) and on a quantized base (QLoRA)."""

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapters import adapters_fingerprint
from ..errors import UserError
from ..models import apply_adapters, is_quantized
from ..schemas.identity import short_value
from .config import TrainConfig


def prepare_policy(model: nn.Module, cfg: TrainConfig) -> int:
    """Freeze the model, make the chosen part trainable; returns the trainable parameter count.

    With `cfg.adapter_path` the adapters' own LoRA/DoRA layers are the trainable part (their
    options are cfg's, see TrainConfig), so the run's adapters replace them for mlx_lm."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if cfg.num_layers > len(model.layers):
        raise UserError(f"--num-layers {cfg.num_layers}: the model has only {len(model.layers)} layers")
    if cfg.fine_tune_type == "full" and is_quantized(model):
        raise UserError(f"--fine-tune-type full: {cfg.model} is quantized; train lora or dora on it (QLoRA), "
                        "or give an unquantized model")
    model.freeze()
    if cfg.adapter_path is not None:
        apply_adapters(model, cfg.adapter_path)  # LoRA/DoRA parameters come back trainable
    if cfg.fine_tune_type == "full":
        model.freeze()
        for layer in model.layers[-max(cfg.num_layers, 0):]:  # -1 -> [-0:] -> all layers
            layer.unfreeze()
    elif cfg.adapter_path is None:
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
        linear_to_lora_layers(model, cfg.num_layers, lora, use_dora=cfg.fine_tune_type == "dora")
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # mlx-lm's: patches the block class, so every block recomputes
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapters_difference(identity_fields: dict, adapter_path: str | None) -> list[str]:
    """[a phrase] when the policy's starting adapters (or none) are not those of the cache's reference."""
    cached = identity_fields.get("reference_adapters")
    current = adapters_fingerprint(adapter_path) if adapter_path else None
    if cached == current:
        return []
    return [f"its adapters ({short_value(current or 'none')}) are not the cache's reference's "
            f"({short_value(cached or 'none')}; to start from adapters, precompute with the same --adapter-path)"]
