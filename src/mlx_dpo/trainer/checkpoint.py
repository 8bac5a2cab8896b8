"""⑥ What a run leaves behind: mlx-lm-compatible adapters, resumable checkpoints, the config."""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import starting_lora_keys
from ..errors import UserError
from ..schemas.atomic import atomic_dir, atomic_path, write_text_atomic
from .config import TrainConfig

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
# Options that only change what is reported; a resumed run may change them, not the others.
# Not val_batches: it picks the evaluated pairs, which must stay the same for the whole run.
REPORTING_OPTIONS = ("steps_per_report", "steps_per_eval", "steps_per_save", "eval_generate", "eval_max_tokens")
# ... nor the layout of the batches: the same losses to float rounding (and runs from before it was an option).
FREE_ON_RESUME = (*REPORTING_OPTIONS, "prompt_once")


def _save_safetensors_atomic(arrays: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), arrays)


def adapter_config(cfg: TrainConfig) -> dict:
    """The keys `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` read, plus our provenance."""
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
                            **starting_lora_keys(cfg.adapter_path)},  # the layers the run's adapters sit on
        "model": cfg.model,
        "trainer": "mlx-dpo",
        "cache": cfg.cache[0] if len(cfg.cache) == 1 else list(cfg.cache),
        "beta": cfg.beta,
        "label_smoothing": cfg.label_smoothing,
    }


def run_config(cfg: TrainConfig, cache_identity: str | list[str], ranks: int) -> dict:
    """config.yaml: the options, the cache(s) and the number of ranks (the global batch, and which rows
    each step holds, depend on it). One cache is written as a path, several as a list (and their
    identities as a list)."""
    cache = cfg.cache[0] if len(cfg.cache) == 1 else list(cfg.cache)
    return {**asdict(cfg), "cache": cache, "cache_identity": cache_identity, "ranks": ranks}


def save_run_config(cfg: TrainConfig, run_dir: Path, cache_identity: str, ranks: int = 1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(cfg, cache_identity, ranks)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(run_dir / ADAPTER_CONFIG, json.dumps(adapter_config(cfg), indent=2) + "\n")


def save_adapters(model: nn.Module, run_dir: Path, step: int) -> Path:
    """adapters.safetensors (latest) and NNNNNNN_adapters.safetensors (this step), as mlx-lm names them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    _save_safetensors_atomic(weights, run_dir / f"{step:07d}_{ADAPTERS}")
    _save_safetensors_atomic(weights, run_dir / ADAPTERS)
    return run_dir / ADAPTERS


@dataclass
class Cursor:
    """Where the train stream stands: its next step is global batch number `batches` of `epoch`."""

    epoch: int = 0
    batches: int = 0


class TrackedBatches:
    """The train stream's steps (this rank's micro-batches of each global batch), keeping the cursor a
    checkpoint needs to resume the stream."""

    def __init__(self, stream, start: Cursor):
        self.cursor = Cursor(start.epoch, start.batches)
        self._pairs = stream.forever(start.epoch, start.batches)

    def __iter__(self):
        return self

    def __next__(self):
        epoch, step = next(self._pairs)
        if epoch != self.cursor.epoch:
            self.cursor = Cursor(epoch, 0)
        self.cursor.batches += 1
        return step


@dataclass
class Checkpoint:
    path: Path
    step: int
    cursor: Cursor
    rng_key: list[int]  # mx.random's key, two uint32
    cache_pairs: list[int] | None = None  # several caches: pairs per cache trained since the last report


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, cursor: Cursor,
                    cache_pairs: list[int] | None = None) -> Path:
    """RUN/checkpoints/NNNNNNN/: trainable weights, optimizer state (moments, step, learning rate),
    RNG key, stream cursor and, with several caches, the pairs per cache not yet reported. Built in a temp directory and renamed, so a checkpoint directory is
    always whole; older checkpoints are removed after."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{step:07d}"
    with atomic_dir(final) as tmp:  # fsynced files and folders: a saved checkpoint survives a power cut
        mx.save_safetensors(str(tmp / ADAPTERS), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
        state = {"step": step, "epoch": cursor.epoch, "batches": cursor.batches, "rng_key": mx.random.state[0].tolist(),
                 "cache_pairs": cache_pairs}
        (tmp / STATE).write_text(json.dumps(state) + "\n")
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint (temp directories of a crashed save are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    steps = sorted(p for p in root.glob("[0-9]" * 7) if (p / STATE).is_file()) if root.is_dir() else []
    if not steps:
        return None
    try:
        state = json.loads((steps[-1] / STATE).read_text())
        return Checkpoint(steps[-1], state["step"], Cursor(state["epoch"], state["batches"]), state["rng_key"],
                          state.get("cache_pairs"))  # absent before it was stored: counting restarts
    except (ValueError, KeyError) as error:
        raise UserError(f"{steps[-1] / STATE}: unreadable checkpoint state ({error})") from error


def restore_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer) -> None:
    """Put the weights, optimizer state and RNG back as they were when `checkpoint` was saved."""
    model.load_weights(str(checkpoint.path / ADAPTERS), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(checkpoint.path / OPTIMIZER)).items()))
    high, low = checkpoint.rng_key
    mx.random.seed((high << 32) | low)  # the key is the seed's two halves, so this restores it exactly


def check_resumable(run_dir: Path, cfg: TrainConfig, cache_identity: str, ranks: int = 1) -> None:
    """A run resumes only with the options it started with (reporting and layout aside), the same cache and the
    same number of ranks (its cursor counts global batches, whose size and rows depend on them)."""
    path = Path(run_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the run's configuration ({error})") from error
    saved.setdefault("ranks", 1)  # runs from before ranks were recorded
    current = run_config(cfg, cache_identity, ranks)
    differ = [k for k in sorted(set(saved) | set(current)) if k not in FREE_ON_RESUME and saved.get(k) != current.get(k)]
    if differ:
        raise UserError(f"{run_dir}: cannot resume with other options ("
                        + "; ".join(f"{k}: run {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
                        + "); use them, or start a new run with another --output")


def resume_point(run_dir: Path, cfg: TrainConfig, cache_identity: str, ranks: int = 1) -> Checkpoint:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir}: no checkpoint to resume from (one is saved every --steps-per-save steps)")
    check_resumable(run_dir, cfg, cache_identity, ranks)
    return checkpoint


def start_run_dir(cfg: TrainConfig, run_dir: Path, cache_identity: str, overwrite: bool, ranks: int = 1) -> None:
    if overwrite and run_dir.exists():
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # never resume an old run's state
    save_run_config(cfg, run_dir, cache_identity, ranks)
