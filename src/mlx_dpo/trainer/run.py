"""`mlx-dpo train`: check the cache against the policy, build the pieces, run train()."""

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from ..errors import UserError
from ..models import checked_model_path, load_model, load_tokenizer
from ..schemas import read_manifest, tokenizer_fingerprint
from ..schemas.identity import _short
from .checkpoint import save_adapters, save_run_config
from .config import TrainConfig
from .metrics import MetricsLog, format_report
from .policy import prepare_policy
from .stream import PairStream
from .train import evaluate, make_loss_fn, train


def open_cache(cache: str):
    """The manifest of a complete cache, after a cheap check that every shard is whole."""
    try:
        manifest = read_manifest(Path(cache))
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    for split in manifest.splits.values():
        for shard in split.shards:
            path = Path(cache) / shard.path
            if not path.is_file():
                raise UserError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != shard.bytes:
                raise UserError(f"{path}: {path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced)")
    return manifest


def check_tokenizer(manifest, tokenizer, cache: str, model: str) -> None:
    cached, current = manifest.identity_fields["tokenizer"], tokenizer_fingerprint(tokenizer)
    if cached != current:
        raise UserError(
            f"tokenizer differs: cache {_short(cached)}, model {_short(current)} "
            f"({cache} was precomputed with another tokenizer than {model}'s; the token ids would not match)"
        )


def build_schedule(cfg: TrainConfig):
    decay_steps = cfg.iters - cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(cfg.learning_rate, decay_steps, end=cfg.min_learning_rate)
    else:
        main = lambda step: mx.array(cfg.learning_rate)  # noqa: E731
    if cfg.warmup_steps == 0:
        return main
    warmup = optim.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optim.join_schedules([warmup, main], [cfg.warmup_steps])


def _split_stream(manifest, cache: str, split: str, cfg: TrainConfig, pad_id: int, shuffle: bool):
    shards = [Path(cache) / s.path for s in manifest.splits[split].shards]
    return PairStream(
        shards, batch_size=cfg.batch_size, max_length=manifest.max_length,
        truncation_mode=manifest.truncation_mode, pad_id=pad_id, shuffle=shuffle,
        seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
    )


def run_training(cfg: TrainConfig, overwrite: bool = False, log=print) -> list[dict]:
    """Train; returns every metrics record written."""
    run_dir = Path(cfg.output)
    if (run_dir / "metrics.jsonl").exists() and not overwrite:
        raise UserError(f"{run_dir}: already holds a run (metrics.jsonl); use another --output or --overwrite")
    manifest = open_cache(cfg.cache)
    if manifest.splits["train"].rows_cached == 0:
        raise UserError(f"{cfg.cache}: the train split has no cached rows")
    model_path = checked_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    check_tokenizer(manifest, tokenizer, cfg.cache, cfg.model)

    mx.random.seed(cfg.seed)  # LoRA initialisation
    model = load_model(model_path)
    trainable = prepare_policy(model, cfg)
    log(f"Policy {cfg.model}: {cfg.fine_tune_type}, {trainable / 1e6:.3f}M trainable parameters; "
        f"reference from cache {manifest.identity[:12]} (not loaded)")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_stream = _split_stream(manifest, cfg.cache, "train", cfg, pad_id, shuffle=True)
    eval_stream = _split_stream(manifest, cfg.cache, "valid", cfg, pad_id, shuffle=False) if "valid" in manifest.splits else None

    if overwrite and run_dir.exists():
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    save_run_config(cfg, run_dir, manifest.identity)
    metrics_log, records = MetricsLog(run_dir / "metrics.jsonl"), []
    loss_fn = make_loss_fn(cfg.loss_options())

    def report(step: int, split: str, metrics: dict) -> None:
        records.append(metrics_log.write(step, split, metrics))
        log(format_report(records[-1]))

    def run_eval(step: int) -> None:
        report(step, "eval", evaluate(model, loss_fn, eval_stream.epoch(0), cfg.val_batches))

    optimizer = optim.AdamW(learning_rate=build_schedule(cfg), weight_decay=cfg.weight_decay)
    if eval_stream is not None:
        model.eval()
        run_eval(0)  # the policy is still the reference here: loss ln 2, margins 0
    train(
        model, optimizer, (batch for _, batch in train_stream.forever()), loss_fn,
        iters=cfg.iters, grad_accumulation_steps=cfg.grad_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
        steps_per_report=cfg.steps_per_report, steps_per_eval=cfg.steps_per_eval, steps_per_save=cfg.steps_per_save,
        on_report=lambda step, metrics: report(step, "train", metrics),
        on_eval=run_eval if eval_stream is not None else None,
        on_save=lambda step: save_adapters(model, run_dir, step),
    )
    evals = [r for r in records if r["split"] == "eval"]
    if len(evals) > 1:
        before, after = evals[0], evals[-1]
        log(f"Held-out: loss {before['loss']:.4f} -> {after['loss']:.4f}, "
            f"rewards/margins {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}, "
            f"rewards/accuracies {after['rewards/accuracies']:.3f} after training")
    log(f"Saved adapters to {run_dir / 'adapters.safetensors'} "
        f"(use: mlx_lm.generate --model {cfg.model} --adapter-path {run_dir})")
    return records
