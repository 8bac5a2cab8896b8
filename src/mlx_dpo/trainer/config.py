"""TrainConfig: every option of `mlx-dpo train`, validated. Imports no mlx."""

from dataclasses import dataclass, field

from ..errors import UserError

FINE_TUNE_TYPES = ("lora", "dora", "full")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    # data / model / output
    cache: str = field(metadata={"help": "Reference cache directory written by `mlx-dpo precompute`."})
    model: str = field(metadata={"help": "Starting policy: local directory or Hugging Face id (usually the reference model)."})
    output: str = field(metadata={"help": "Run directory: adapters, checkpoints, metrics.jsonl, config.yaml."})
    # loss
    beta: float = field(default=0.1, metadata={"help": "DPO temperature β: strength of the pull towards the reference."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO ε in [0, 0.5): assumed rate of flipped labels."})
    # fine-tuning
    fine_tune_type: str = field(default="lora", metadata={"help": "lora, dora or full (mlx-lm's tuner)."})
    num_layers: int = field(default=-1, metadata={"help": "Trained transformer blocks, counted from the last; -1 for all."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA/DoRA rank."})
    lora_scale: float = field(default=20.0, metadata={"help": "LoRA/DoRA scale (mlx-lm's 'scale', not alpha)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    # optimisation
    iters: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Preference pairs per micro-batch."})
    grad_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate."})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine (decay to min_learning_rate) or constant, after warmup."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps from 0 to the peak learning rate."})
    min_learning_rate: float = field(default=0.0, metadata={"help": "Learning rate at the end of the cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 turns clipping off."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and LoRA initialisation."})
    shuffle_buffer: int = field(default=4096, metadata={"help": "Rows held for shuffling and length bucketing."})
    # reporting and saving
    steps_per_report: int = field(default=10, metadata={"help": "Report training metrics every N steps (and at step 1)."})
    steps_per_eval: int = field(default=100, metadata={"help": "Evaluate on the cache's valid split every N steps (and at the end)."})
    val_batches: int = field(default=25, metadata={"help": "Batches per evaluation; -1 for the whole valid split."})
    steps_per_save: int = field(default=100, metadata={"help": "Save adapters and a resumable checkpoint every N steps."})

    def __post_init__(self):
        checks = [
            (self.fine_tune_type in FINE_TUNE_TYPES, f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.beta > 0, "--beta must be positive"),
            (0 <= self.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)"),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.num_layers == -1 or self.num_layers > 0, "--num-layers must be positive or -1"),
            (self.val_batches == -1 or self.val_batches > 0, "--val-batches must be positive or -1"),
        ]
        for name in ("iters", "batch_size", "grad_accumulation_steps", "lora_rank", "shuffle_buffer",
                     "steps_per_report", "steps_per_eval", "steps_per_save"):
            checks.append((getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1"))
        checks.append((0 <= self.warmup_steps < self.iters, "--warmup-steps must be in [0, iters)"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def pairs_per_step(self) -> int:
        """Preference pairs behind one optimizer step (per process)."""
        return self.batch_size * self.grad_accumulation_steps
