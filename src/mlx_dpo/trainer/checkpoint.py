"""⑥ What a run leaves behind: mlx-lm-compatible adapters, resumable checkpoints, the config."""

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten

from ..schemas.atomic import atomic_path, write_text_atomic
from .config import TrainConfig

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _save_safetensors_atomic(arrays: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), arrays)


def adapter_config(cfg: TrainConfig) -> dict:
    """The keys `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` read, plus our provenance."""
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout},
        "model": cfg.model,
        "trainer": "mlx-dpo",
        "cache": cfg.cache,
        "beta": cfg.beta,
        "label_smoothing": cfg.label_smoothing,
    }


def save_run_config(cfg: TrainConfig, run_dir: Path, cache_identity: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**asdict(cfg), "cache_identity": cache_identity}
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(run_dir / ADAPTER_CONFIG, json.dumps(adapter_config(cfg), indent=2) + "\n")


def save_adapters(model: nn.Module, run_dir: Path, step: int) -> Path:
    """adapters.safetensors (latest) and NNNNNNN_adapters.safetensors (this step), as mlx-lm names them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    _save_safetensors_atomic(weights, run_dir / f"{step:07d}_{ADAPTERS}")
    _save_safetensors_atomic(weights, run_dir / ADAPTERS)
    return run_dir / ADAPTERS
