"""TrainConfig: every option of `mlx-dpo train`, validated. Imports no mlx."""

import os
from dataclasses import dataclass, field

from ..adapters import DEFAULTS, resolve_options
from ..errors import UserError
from .mixture import parse_cache_weights

FINE_TUNE_TYPES = ("lora", "dora", "full")
LR_SCHEDULES = ("cosine", "constant")
PROMPT_ONCE = ("auto", "on", "off")


def same_cache(location: str) -> str:
    """One spelling per cache: a local path resolved (`a`, `./a/` and a symlink to it are one), a URL
    without trailing slashes."""
    from ..pipeline.remote import is_remote

    return str(location).rstrip("/") if is_remote(location) else os.path.realpath(location)


# Names of mlx_dpo.losses.LOSSES (a test keeps the two equal; this module must not import mlx).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
REJECTED_AGGREGATIONS = ("pairwise", "softmax")
# Losses built on the f-divergence scores (TRL 1.16's set); the others use plain log-ratios.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Losses that read --label-smoothing (mlx_dpo.losses: conservative DPO, EXO, robust, AOT, SimPO).
LABEL_SMOOTHING_LOSSES = ("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo")
# Losses that compare pairs across the batch: they need the whole global batch in one forward.
BATCH_LOSSES = ("aot", "aot_unpaired")


@dataclass(frozen=True)
class TrainConfig:
    # data / model / output
    cache: tuple[str, ...] = field(metadata={"group": "Data", "help": "Reference cache written by `mlx-dpo precompute`: a directory, or s3://bucket/prefix (downloaded to ~/.cache/mlx-dpo/remote). Repeat it to train on several caches of one reference, sampled by --cache-weights."})
    model: str = field(metadata={"group": "Model", "help": "Starting policy: local directory or Hugging Face id (usually the reference model)."})
    output: str = field(metadata={"group": "Output", "help": "Run directory: adapters, checkpoints, metrics.jsonl, config.yaml."})
    cache_weights: str | None = field(default=None, metadata={"group": "Data", "help": "With several --cache: comma-separated sampling weights, one per --cache (e.g. 0.7,0.3): each epoch, as many pairs as their train splits hold together, takes these shares of them.", "shown_default": "the caches' sizes: plain concatenation"})
    # loss
    beta: float = field(default=0.1, metadata={"group": "Loss", "help": "DPO temperature β: strength of the pull towards the reference."})
    label_smoothing: float = field(default=0.0, metadata={"group": "Loss", "help": "Conservative DPO ε in [0, 0.5): assumed rate of flipped labels."})
    loss_type: str = field(default="sigmoid", metadata={"group": "Loss", "help": "Loss, or comma-separated losses summed with --loss-weights: " + ", ".join(LOSS_TYPES) + "."})
    loss_weights: str | None = field(default=None, metadata={"group": "Loss", "help": "Comma-separated weights, one per --loss-type (default all 1)."})
    rpo_alpha: float | None = field(default=None, metadata={"group": "Loss", "help": "Add rpo_alpha × NLL of the chosen completion (RPO; same as adding 'sft')."})
    reference_free: bool = field(default=False, metadata={"group": "Loss", "help": "Ignore the cached reference (reference-free DPO)."})
    rejected_aggregation: str = field(default="pairwise", metadata={"group": "Loss", "help": "Several rejected per prompt: pairwise (mean over K pairs) or softmax (Plackett-Luce top-1)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"group": "Loss", "help": "f-divergence on the log-ratios: " + ", ".join(F_DIVERGENCES) + "."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"group": "Loss", "help": "α of alpha_divergence (TRL's default 0.5; 1 is reverse KL)."})
    simpo_gamma: float = field(default=0.5, metadata={"group": "Loss", "help": "SimPO target margin γ."})
    discopop_tau: float = field(default=0.05, metadata={"group": "Loss", "help": "DiscoPOP gate temperature τ."})
    ld_alpha: float | None = field(default=None, metadata={"group": "Loss", "help": "LD-DPO α in [0, 1]: weight of the tokens past the shorter answer's length (needs a K = 1 cache)."})
    # fine-tuning
    adapter_path: str | None = field(default=None, metadata={"group": "Model", "help": "Start from these mlx-lm adapters (e.g. an mlx_lm.lora SFT run): LoRA/DoRA training continues on them, and the options below come from their adapter_config.json."})
    # None: from --adapter-path's adapter_config.json, else adapters.DEFAULTS
    fine_tune_type: str | None = field(default=None, metadata={"group": "Model", "help": "lora, dora or full (mlx-lm's tuner).", "shown_default": "lora, or the adapters'"})
    num_layers: int | None = field(default=None, metadata={"group": "Model", "help": "Trained transformer blocks, counted from the last; -1 for all.", "shown_default": "-1, or the adapters'"})
    lora_rank: int | None = field(default=None, metadata={"group": "Model", "help": "LoRA/DoRA rank.", "shown_default": "8, or the adapters'"})
    lora_scale: float | None = field(default=None, metadata={"group": "Model", "help": "LoRA/DoRA scale (mlx-lm's 'scale', not alpha).", "shown_default": "20.0, or the adapters'"})
    lora_dropout: float | None = field(default=None, metadata={"group": "Model", "help": "Dropout on the LoRA input.", "shown_default": "0.0, or the adapters'"})
    grad_checkpoint: bool = field(default=False, metadata={"group": "Model", "help": "Recompute each transformer block's activations in the backward pass instead of storing them (mlx-lm's option): less memory, more compute; same loss and gradients."})
    prompt_once: str = field(default="auto", metadata={"group": "Model", "help": "auto, on or off: run each pair's prompt once, its chosen and rejected answers attending to its keys and values, instead of once per answer (the same losses to float rounding; llama, qwen2, qwen3). auto: on when that saves at least 10% of the tokens of the first shuffle buffer's batches, and not with --grad-checkpoint."})
    trust_remote_code: bool = field(default=False, metadata={"group": "Model", "help": "Allow the model directory's own Python code (custom tokenizer or model file) to run."})
    # optimisation
    iters: int = field(default=1000, metadata={"group": "Optimisation", "help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"group": "Optimisation", "help": "Preference pairs per micro-batch and rank; a step's global batch is batch_size x ranks x grad_accumulation_steps."})
    grad_accumulation_steps: int = field(default=1, metadata={"group": "Optimisation", "help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-5, metadata={"group": "Optimisation", "help": "Peak AdamW learning rate."})
    lr_schedule: str = field(default="cosine", metadata={"group": "Optimisation", "help": "cosine (decay to min_learning_rate) or constant, after warmup."})
    warmup_steps: int = field(default=0, metadata={"group": "Optimisation", "help": "Linear warmup steps from 0 to the peak learning rate."})
    min_learning_rate: float = field(default=0.0, metadata={"group": "Optimisation", "help": "Learning rate at the end of the cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"group": "Optimisation", "help": "AdamW decoupled weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"group": "Optimisation", "help": "Clip the global gradient norm to this; 0 turns clipping off."})
    seed: int = field(default=0, metadata={"group": "Optimisation", "help": "Seed for data order and LoRA initialisation."})
    shuffle_buffer: int = field(default=4096, metadata={"group": "Data", "help": "Rows held for shuffling and length bucketing."})
    # reporting and saving
    steps_per_report: int = field(default=10, metadata={"group": "Output", "help": "Report training metrics every N steps (and at step 1)."})
    steps_per_eval: int = field(default=100, metadata={"group": "Output", "help": "Evaluate on the cache's valid split every N steps (and at the end)."})
    val_batches: int | None = field(default=None, metadata={"group": "Output", "help": "Batches per evaluation: a fixed seeded sample of the valid split, the same at every evaluation; -1 for the whole split. Default: the whole split up to 1,000 pairs, else 25 batches."})
    steps_per_save: int = field(default=100, metadata={"group": "Output", "help": "Save adapters and a resumable checkpoint every N steps."})
    eval_generate: int = field(default=0, metadata={"group": "Output", "help": "At step 0 and each evaluation, write the policy's greedy answers to the first N distinct valid prompts to OUTPUT/samples.jsonl."})
    eval_max_tokens: int = field(default=64, metadata={"group": "Output", "help": "Most tokens per --eval-generate answer."})

    def __post_init__(self):
        if isinstance(self.cache, str):  # one cache given in code or an older config.yaml
            object.__setattr__(self, "cache", (self.cache,))
        seen: dict[str, str] = {}
        for cache in self.cache:
            if (first := seen.get(key := same_cache(cache))) is not None:
                also = "" if first == cache else f" (the same cache as --cache {first})"
                raise UserError(f"--cache {cache} is given twice{also}; to draw more of it, use --cache-weights")
            seen[key] = cache
        self.mixture_weights  # noqa: B018  (raises UserError on bad --cache-weights)
        given = {name: getattr(self, name) for name in DEFAULTS}
        for name, value in resolve_options(given, self.adapter_path).items():
            object.__setattr__(self, name, value)  # frozen: resolved once, here
        checks = [
            (self.fine_tune_type in FINE_TUNE_TYPES, f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.prompt_once in PROMPT_ONCE, f"--prompt-once must be one of {', '.join(PROMPT_ONCE)}"),
            (not (self.prompt_once == "on" and self.grad_checkpoint),
             "--prompt-once on: not with --grad-checkpoint (its recomputed blocks do not pass the prompt's keys on)"),
            (self.beta > 0, "--beta must be positive"),
            (0 <= self.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)"),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.num_layers == -1 or self.num_layers > 0, "--num-layers must be positive or -1"),
            (self.val_batches in (None, -1) or self.val_batches > 0, "--val-batches must be positive or -1"),
            (self.eval_generate >= 0, "--eval-generate must be >= 0"),
            (self.eval_max_tokens >= 1, "--eval-max-tokens must be at least 1"),
        ]
        for name in ("iters", "batch_size", "grad_accumulation_steps", "lora_rank", "shuffle_buffer",
                     "steps_per_report", "steps_per_eval", "steps_per_save"):
            checks.append((getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1"))
        checks.append((0 <= self.warmup_steps < self.iters, "--warmup-steps must be in [0, iters)"))
        types = self.loss_types
        checks += [(t in LOSS_TYPES, f"--loss-type {t!r}: not one of {', '.join(LOSS_TYPES)}") for t in types]
        checks += [
            (self.loss_weights is None or len(self.weights) == len(types), "--loss-weights needs one weight per --loss-type"),
            (self.f_divergence_type in F_DIVERGENCES, f"--f-divergence-type must be one of {', '.join(F_DIVERGENCES)}"),
            (self.rejected_aggregation in REJECTED_AGGREGATIONS, "--rejected-aggregation must be pairwise or softmax"),
            (self.rejected_aggregation == "pairwise" or set(types) <= {"sigmoid", "sft"},
             "--rejected-aggregation softmax is defined for the sigmoid loss only"),
            (self.rejected_aggregation == "pairwise" or self.label_smoothing == 0,
             "--label-smoothing has no effect with --rejected-aggregation softmax"),
            (self.label_smoothing == 0 or any(t in LABEL_SMOOTHING_LOSSES for t in types),
             f"--label-smoothing has no effect on --loss-type {self.loss_type} (used by {', '.join(LABEL_SMOOTHING_LOSSES)})"),
            (self.f_divergence_type == "reverse_kl" or set(types) <= set(F_DIVERGENCE_LOSSES),
             f"--f-divergence-type {self.f_divergence_type} has no effect on --loss-type "
             f"{', '.join(t for t in types if t not in F_DIVERGENCE_LOSSES)} (used by {', '.join(F_DIVERGENCE_LOSSES)})"),
            (self.grad_accumulation_steps == 1 or not set(types) & set(BATCH_LOSSES),
             "--loss-type aot/aot_unpaired sorts across the batch: use a larger --batch-size, not --grad-accumulation-steps"),
            (self.discopop_tau > 0, "--discopop-tau must be positive"),
            ("exo_pair" not in types or self.label_smoothing > 0,
             "--loss-type exo_pair needs --label-smoothing > 0 (as TRL 1.16; the EXO paper recommends 1e-3)"),
            (self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "--ld-alpha must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def mixture_weights(self) -> list[float] | None:
        """--cache-weights as numbers, one per --cache; None for the default (the caches' sizes)."""
        return parse_cache_weights(self.cache_weights, len(self.cache))

    @property
    def loss_types(self) -> list[str]:
        types = [t.strip() for t in self.loss_type.split(",") if t.strip()]
        return types + ["sft"] if self.rpo_alpha is not None else types

    @property
    def weights(self) -> list[float]:
        try:
            weights = [float(w) for w in self.loss_weights.split(",")] if self.loss_weights else []
        except ValueError as error:
            raise UserError(f"--loss-weights: {error}") from error
        weights = weights or [1.0] * len(self.loss_type.split(","))
        return weights + [self.rpo_alpha] if self.rpo_alpha is not None else weights

    def loss_options(self) -> dict:
        """Keyword arguments of mlx_dpo.losses.preference_loss."""
        return dict(
            loss_type=self.loss_types, loss_weights=self.weights, beta=self.beta,
            label_smoothing=self.label_smoothing, reference_free=self.reference_free,
            rejected_aggregation=self.rejected_aggregation, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, simpo_gamma=self.simpo_gamma,
            discopop_tau=self.discopop_tau,
        )

    @property
    def pairs_per_step(self) -> int:
        """Preference pairs behind one optimizer step (per process)."""
        return self.batch_size * self.grad_accumulation_steps
