"""`mlx-dpo train`: check the cache against the policy, build the pieces, run train()."""

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ..distributed import world
from ..errors import UserError
from ..models import checked_model_path, compute_dtype, load_model, load_tokenizer, weights_hash
from ..prompt_once import SHARED_PROMPT_MODULES, can_share_prompt
from ..schemas import read_manifest, tokenizer_fingerprint
from ..schemas.identity import short_value
from ..schemas.verify import check_cache
from .checkpoint import (
    Cursor,
    TrackedBatches,
    restore_checkpoint,
    resume_point,
    save_adapters,
    save_checkpoint,
    start_run_dir,
)
from .config import BATCH_LOSSES, TrainConfig
from .eval_outputs import EvalOutputs
from .metrics import MetricsLog, format_report
from .mixture import check_mixable, mixture_summary
from .pair_log import PairCollector
from .policy import adapters_difference, prepare_policy
from .stream import PairStream
from .train import evaluate, make_loss_fn, train


def open_cache(cache: str, full: bool = False):
    """The manifest of a complete cache, after a cheap check (paths, sizes, row counts) or, with
    `full`, the whole of `mlx-dpo cache verify` (sha256, schema, values, row accounting)."""
    try:
        manifest = read_manifest(Path(cache))
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    problems = check_cache(Path(cache), manifest, full=full)
    if problems:
        more = f" (and {len(problems) - 1} more: `mlx-dpo cache verify {cache}`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return manifest


def check_tokenizer(manifest, tokenizer, cache: str, model: str) -> None:
    cached, current = manifest.identity_fields["tokenizer"], tokenizer_fingerprint(tokenizer)
    if cached != current:
        raise UserError(
            f"tokenizer differs: cache {short_value(cached)}, model {short_value(current)} "
            f"({cache} was precomputed with another tokenizer than {model}'s; the token ids would not match)"
        )


def reference_difference(manifest, model: str, model_path: Path, dtype: str, adapter_path: str | None = None) -> str | None:
    """One line when the starting policy is not the cache's reference as it was computed (other
    weights, adapters or compute dtype): legitimate, but step 1 then does not start at ln 2."""
    fields, differs = manifest.identity_fields, adapters_difference(manifest.identity_fields, adapter_path)
    if (current := weights_hash(model_path)) != fields["reference_weights"]:
        differs.append(f"its weights ({short_value(current)}) are not the cache's reference "
                       f"({short_value(fields['reference_weights'])})")
    if dtype != fields["dtype"]:
        differs.append(f"it computes in {dtype}, the cache's reference was computed in {fields['dtype']}")
    if not differs:
        return None
    return f"Note: policy {model}: {'; '.join(differs)}; so step 1's loss is not exactly ln 2 nor its margins 0"


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


def build_optimizer(cfg: TrainConfig) -> optim.AdamW:
    """AdamW as torch.optim.AdamW (bias correction on; betas 0.9/0.999, eps 1e-8, decoupled weight
    decay), so TRL recipes' learning rates mean the same step. mlx-lm's default turns the correction off."""
    return optim.AdamW(learning_rate=build_schedule(cfg), weight_decay=cfg.weight_decay, bias_correction=True)


def open_caches(cfg: TrainConfig, verify_cache: bool) -> list:
    """The manifests of cfg.cache, each checked (open_cache) and holding train rows; several must be of
    one reference (mixture.check_mixable)."""
    manifests = [open_cache(cache, full=verify_cache) for cache in cfg.cache]
    for cache, manifest in zip(cfg.cache, manifests):
        if manifest.splits["train"].rows_cached == 0:
            raise UserError(f"{cache}: the train split has no cached rows")
        if cfg.ld_alpha is not None and manifest.rejected_per_prompt > 1:
            raise UserError(f"--ld-alpha: {cache} holds {manifest.rejected_per_prompt} rejected answers per prompt; "
                            "LD-DPO is supported for one")
    check_mixable(manifests, list(cfg.cache))
    return manifests


# --prompt-once auto: the layout once per pair when it saves at least this share of the token positions.
# Figure 6 (README, full bench of 2026-11-30 14:45 UTC): the step follows the tokens (31% fewer: 0.70x /
# 0.72x the step, full / LoRA), and where none are saved it costs 1-2%; 10% stays clear of that.
PROMPT_ONCE_SAVING = 0.10


def prompt_layout(cfg: TrainConfig, model, stream: PairStream) -> tuple[bool, str]:
    """Whether the run lays its batches out once per pair (--prompt-once), decided once per run so the
    compiled step keeps one layout, and why (a phrase). Raises UserError for `on` where it cannot be."""
    if cfg.prompt_once == "off":
        return False, "--prompt-once off"
    if not can_share_prompt(model):
        why = f"{type(model).__module__} models (checked: {', '.join(m.split('.')[-1] for m in SHARED_PROMPT_MODULES)})"
        if cfg.prompt_once == "on":
            raise UserError(f"--prompt-once on: {cfg.model} cannot share its prompt: not checked for {why}")
        return False, f"auto: not for {why}"
    # mlx-lm's grad_checkpoint patches the block class for the whole process (an earlier run in it, say)
    if "grad_checkpoint" in type(model.layers[0]).__call__.__qualname__:
        if cfg.prompt_once == "on":
            raise UserError("--prompt-once on: the model's blocks recompute their activations (--grad-checkpoint, "
                            "in this run or an earlier one of this process), which loses the prompt keys' gradient")
        return False, "auto: not with --grad-checkpoint"
    if cfg.prompt_once == "on":
        return True, "--prompt-once on"
    plain, once = stream.layout_tokens()
    saving = 1 - once / max(plain, 1)
    return saving >= PROMPT_ONCE_SAVING, (f"auto: the first batches hold {once:,} token positions instead of {plain:,}, "
                                          f"{saving:.0%} fewer ({PROMPT_ONCE_SAVING:.0%} needed)")


def _split_stream(manifests: list, caches: list[str], split: str, cfg: TrainConfig, pad_id: int, train: bool, group,
                  prompt_once: bool = False):
    """The stream of `split` of one cache, or of the caches in `caches` (a mixture, or evaluation's concatenation)."""
    shards = [[Path(c) / s.path for s in m.splits[split].shards] for m, c in zip(manifests, caches)]
    return PairStream(
        shards if len(cfg.cache) > 1 else shards[0], batch_size=cfg.batch_size, max_length=manifests[0].max_length,
        truncation_mode=manifests[0].truncation_mode, pad_id=pad_id, shuffle=train,
        seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, with_tails=cfg.ld_alpha is not None,
        rank=group.rank(), ranks=group.size(), micro_batches=cfg.grad_accumulation_steps if train else 1,
        weights=cfg.mixture_weights, prompt_once=prompt_once,
        # the compiled step sees one row count; not for losses that sort across the batch's pairs
        fixed_rows=train and not set(cfg.loss_types) & set(BATCH_LOSSES),
    )


# Valid splits up to this many pairs are scored whole by default.
WHOLE_EVAL_PAIRS = 1000
DEFAULT_VAL_BATCHES = 25


def eval_sample(rows: int, cfg: TrainConfig, ranks: int) -> set[int] | None:
    """Positions (file order) of the valid rows every evaluation scores: None for all of them, else a
    seeded uniform sample of --val-batches global batches, the same at every evaluation."""
    batches = cfg.val_batches
    if batches is None:
        batches = -1 if rows <= WHOLE_EVAL_PAIRS else DEFAULT_VAL_BATCHES
    wanted = rows if batches == -1 else min(rows, batches * cfg.batch_size * ranks)
    if wanted == rows:
        return None
    return set(np.random.default_rng([cfg.seed, 1]).choice(rows, wanted, replace=False).tolist())


def run_training(cfg: TrainConfig, overwrite: bool = False, log=print, *, resume: bool = False,
                 verify_cache: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train; returns every metrics record of the run. `resume` continues from the run's last
    checkpoint; `stop_after` ends after that step as if interrupted (the schedule spans cfg.iters)."""
    run_dir = Path(cfg.output)
    group = world()  # mlx.launch: data parallel over its ranks; rank 0 alone writes and reports
    main = group.rank() == 0
    log = log if main else (lambda *args, **kwargs: None)
    if main and (run_dir / "metrics.jsonl").exists() and not (overwrite or resume):  # rank 0 may create it first
        raise UserError(f"{run_dir}: already holds a run (metrics.jsonl); use another --output, --resume or --overwrite")
    manifests = open_caches(cfg, verify_cache)
    manifest, caches = manifests[0], list(cfg.cache)  # several caches share the reference: the first speaks for all
    identity = manifest.identity if len(caches) == 1 else [m.identity for m in manifests]
    model_path = checked_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    check_tokenizer(manifest, tokenizer, caches[0], cfg.model)
    if group.size() > 1 and set(cfg.loss_types) & set(BATCH_LOSSES):
        raise UserError(f"--loss-type {cfg.loss_type} sorts across the batch: run it on one process "
                        f"(here {group.size()} ranks), with the global batch as --batch-size")
    checkpoint = resume_point(run_dir, cfg, identity, group.size()) if resume else None
    if checkpoint is not None and checkpoint.step >= cfg.iters:
        log(f"{run_dir}: already complete ({checkpoint.step} of {cfg.iters} steps); nothing to resume")
        return []

    mx.random.seed(cfg.seed)  # LoRA initialisation
    model = load_model(model_path, cfg.trust_remote_code)
    if (note := reference_difference(manifest, cfg.model, model_path, compute_dtype(model_path), cfg.adapter_path)):
        log(note)
    trainable = prepare_policy(model, cfg)
    start = f" + adapters {cfg.adapter_path}" if cfg.adapter_path else ""
    log(f"Policy {cfg.model}{start}: {cfg.fine_tune_type}, {trainable / 1e6:.3f}M trainable parameters; "
        f"reference from cache{'s' * (len(caches) > 1)} {', '.join(m.identity[:12] for m in manifests)} (not loaded)")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_stream = _split_stream(manifests, caches, "train", cfg, pad_id, True, group)
    train_stream.prompt_once, why = prompt_layout(cfg, model, train_stream)
    log(f"Prompt once per pair: {'on' if train_stream.prompt_once else 'off'} ({why})")
    if len(caches) > 1:
        log(mixture_summary(caches, train_stream.sizes, train_stream.quotas))
    valid = [(m, c) for m, c in zip(manifests, caches) if "valid" in m.splits and m.splits["valid"].rows_cached > 0]
    eval_stream, eval_keep = None, None
    for m, c in zip(manifests, caches):
        if "valid" in m.splits and m.splits["valid"].rows_cached == 0:
            log(f"{c}: the valid split has no cached rows; " + ("no evaluation" if len(caches) == 1 else "not evaluated"))
    if valid:
        eval_stream = _split_stream(*map(list, zip(*valid)), "valid", cfg, pad_id, False, group, train_stream.prompt_once)
        valid_rows = sum(m.splits["valid"].rows_cached for m, _ in valid)
        eval_keep = eval_sample(valid_rows, cfg, group.size())
        log(f"eval on {valid_rows if eval_keep is None else len(eval_keep)} of {valid_rows} pairs of the valid split"
            + ((f"s of {len(valid)} caches" if len(valid) > 1 else f" of {valid[0][1]}") if len(caches) > 1 else "")
            + (" (a fixed seeded sample, the same at every evaluation)" if eval_keep is not None else ""))
    if group.size() > 1 or cfg.grad_accumulation_steps > 1:
        log(f"Global batch {cfg.batch_size} x {group.size()} ranks x {cfg.grad_accumulation_steps} micro-batches = "
            f"{train_stream.global_size} pairs per step; loss and gradients are means over the global batch")

    if checkpoint is None and main:
        start_run_dir(cfg, run_dir, identity, overwrite, group.size())
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    records = metrics_log.keep_until(checkpoint.step) if checkpoint is not None and main else []
    loss_fn = make_loss_fn(cfg.loss_options(), cfg.ld_alpha)

    def report(step: int, split: str, metrics: dict) -> None:
        if "pairs_per_cache" in metrics:  # a list in cache order: name each count by its --cache
            metrics = {**metrics, "pairs_per_cache": dict(zip(caches, metrics["pairs_per_cache"]))}
        if main:
            records.append(metrics_log.write(step, split, metrics))
            log(format_report(records[-1]))

    several_valid = len(caches) > 1 and eval_stream is not None  # eval_pairs then names each pair's cache
    outputs = EvalOutputs(run_dir, eval_stream.sources[0] if eval_stream else None, tokenizer, eval_generate=cfg.eval_generate,
                          eval_max_tokens=cfg.eval_max_tokens, group=group, resume_step=checkpoint.step if checkpoint else None,
                          caches=[c for _, c in valid] if several_valid else None,
                          sample_cache=valid[0][1] if several_valid else None)

    def run_eval(step: int) -> None:
        pairs = PairCollector(several_valid)
        report(step, "eval", evaluate(model, loss_fn, eval_stream.epoch(0, keep=eval_keep), group, pairs.add))
        outputs.write(step, model, pairs)

    def skip(step: int, info: dict) -> None:
        rows = info["indices"]
        if "caches" in info:  # several caches: name each row's
            info = {**info, "caches": [caches[c] for c in info["caches"]]}
            rows = ", ".join(f"{c} {i}" for c, i in zip(info["caches"], rows))
        if main:
            records.append(metrics_log.write(step, "skipped", {"reason": "non-finite loss, gradient or metric", **info}))
            log(f"[skip ] step {step:>5} | loss {info['loss']} | grad_norm {info['grad_norm']} | "
                f"not finite: {', '.join(info['non_finite'])} | not applied; batch rows {rows}")

    optimizer = build_optimizer(cfg)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, model, optimizer)
        log(f"Resuming {run_dir} after step {checkpoint.step} of {cfg.iters} "
            f"(epoch {checkpoint.cursor.epoch}, batch {checkpoint.cursor.batches})")
    elif eval_stream is not None:
        model.eval()
        run_eval(0)  # the policy is still the reference here: loss ln 2, margins 0
    batches = TrackedBatches(train_stream, checkpoint.cursor if checkpoint is not None else Cursor())

    def save(step: int, cache_pairs: list[int] | None) -> None:
        if main:
            save_adapters(model, run_dir, step)
            save_checkpoint(run_dir, step, model, optimizer, batches.cursor, cache_pairs)

    train(
        model, optimizer, batches, loss_fn, iters=cfg.iters, start_step=checkpoint.step if checkpoint else 0,
        stop_after=stop_after, max_grad_norm=cfg.max_grad_norm, on_skip=skip,
        steps_per_report=cfg.steps_per_report, steps_per_eval=cfg.steps_per_eval, steps_per_save=cfg.steps_per_save,
        on_report=lambda step, metrics: report(step, "train", {**metrics, "prompt_once": train_stream.prompt_once}),
        on_eval=run_eval if eval_stream is not None else None, on_save=save, group=group,
        cache_pairs=checkpoint.cache_pairs if checkpoint else None,
    )
    if stop_after is not None and stop_after < cfg.iters:
        log(f"Stopped after step {stop_after} of {cfg.iters} as asked; continue with the same options and --resume")
        return records
    evals = [r for r in records if r["split"] == "eval"]
    if len(evals) > 1:
        before, after = evals[0], evals[-1]
        log(f"Held-out: loss {before['loss']:.4f} -> {after['loss']:.4f}, "
            f"rewards/margins {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}, "
            f"rewards/accuracies {after['rewards/accuracies']:.3f} after training")
    if (shapes := [r["compiled_shapes"] for r in records if r["split"] == "train"]):
        steps = cfg.iters - (checkpoint.step if checkpoint else 0)
        log(f"Compiled step: {shapes[-1]} distinct input shapes (one trace each) in {steps} steps")
    log(f"Saved adapters to {run_dir / 'adapters.safetensors'} "
        f"(use: mlx_lm.generate --model {cfg.model} --adapter-path {run_dir})")
    return records
