"""PrecomputeConfig: every option of `mlx-dpo precompute`, validated. Imports no mlx."""

import json
from dataclasses import dataclass, field

from ..errors import UserError
from ..schemas.identity import DTYPES
from ..schemas.sequence import TRUNCATION_MODES

# apply_chat_template arguments the encoder sets itself (TRL's tokenization: a flat list of ids,
# whole, unpadded), refused in --chat-template-kwargs and a row's chat_template_kwargs.
RESERVED_TEMPLATE_ARGUMENTS = {"conversation", "tokenize", "return_dict", "add_generation_prompt", "continue_final_message",
                               "padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask",
                               "tokenizer_kwargs"}
# Its other arguments shape only the rendered text, so a row or the run may set them.
TEMPLATE_INPUT_ARGUMENTS = {"tools", "documents", "chat_template", "sanitize_control_tokens"}


@dataclass(frozen=True)
class PrecomputeConfig:
    model: str = field(metadata={"group": "Model", "help": "Reference model: local directory or Hugging Face id."})
    data: str = field(metadata={"group": "Data", "help": "Preference data: .jsonl/.json/.parquet/.csv file, folder with train/valid files, or hub id."})
    out: str = field(metadata={"group": "Output", "help": "Cache directory to write (manifest.json + <split>/part-NNNNN.parquet), or s3://bucket/prefix (built locally, then uploaded)."})
    split: str = field(default="train", metadata={"group": "Data", "help": "Data split to train on."})
    valid_fraction: float = field(default=0.0, metadata={"group": "Data", "help": "Hold out this fraction of --split (a fixed, seeded choice) as the valid split, when the data has none."})
    prompt_field: str | None = field(default=None, metadata={"group": "Data", "help": "Prompt column (default: prompt, else ShareGPT's conversations; when neither exists, the prompt is split off chosen and rejected as TRL's extract_prompt does). A column given here must exist."})
    chosen_field: str = field(default="chosen", metadata={"group": "Data", "help": "Chosen-answer column."})
    rejected_field: str = field(default="rejected", metadata={"group": "Data", "help": "Rejected-answer column: one answer, or a list of K answers per prompt."})
    system_field: str | None = field(default=None, metadata={"group": "Data", "help": "System-prompt column (a system message for conversational prompts; default: system, if present). A column given here must exist."})
    max_length: int | None = field(default=1024, metadata={"group": "Tokenization", "help": "Max tokens of prompt+completion (TRL's max_length)."})
    truncation_mode: str = field(default="keep_start", metadata={"group": "Tokenization", "help": "keep_start or keep_end, as TRL."})
    chat_template_kwargs: str | None = field(default=None, metadata={"group": "Tokenization", "help": "JSON object of chat-template options for every row, e.g. '{\"enable_thinking\": false}'; a row's own chat_template_kwargs column wins."})
    dtype: str | None = field(default=None, metadata={"group": "Model", "help": "Compute precision of the reference forward: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's dtype on a GPU); part of the cache identity."})
    adapter_path: str | None = field(default=None, metadata={"group": "Model", "help": "mlx-lm adapters on the model (e.g. an mlx_lm.lora SFT run): the reference is the model with them."})
    tokens_per_batch: int = field(default=8192, metadata={"group": "Model", "help": "Padded tokens per reference forward."})
    rows_per_shard: int = field(default=2048, metadata={"group": "Output", "help": "Input rows per Parquet shard (the unit of resume)."})
    num_shards: int = field(default=1, metadata={"group": "Output", "help": "Split the work over N jobs without a launcher (e.g. a job array); combine with `mlx-dpo cache merge`."})
    shard_index: int = field(default=0, metadata={"group": "Output", "help": "Which of the --num-shards jobs this is (0-based)."})
    overwrite: bool = field(default=False, metadata={"group": "Output", "help": "Rebuild the cache at --out from scratch (removing only cache files: manifest, rejects, <split>/part-*), whatever it holds."})
    strict: bool = field(default=False, metadata={"group": "Data", "help": "Fail if any row would be rejected, instead of skipping it into rejects.jsonl."})
    reuse_from: tuple[str, ...] = field(default=(), metadata={"group": "Output", "help": "Also reuse the reference values of rows this cache (local or s3://; repeatable) already scored with the same reference; the caches beside --out are always searched."})
    no_reuse: bool = field(default=False, metadata={"group": "Output", "help": "Run every row through the reference model, even rows another cache of the same reference already scored."})
    trust_remote_code: bool = field(default=False, metadata={"group": "Model", "help": "Allow the model directory's own Python code (custom tokenizer or model file) to run."})

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise UserError(f"--truncation-mode must be one of {', '.join(TRUNCATION_MODES)}, got {self.truncation_mode!r}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length must be at least 2, got {self.max_length}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.valid_fraction < 1:
            raise UserError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if not 0 <= self.shard_index < max(self.num_shards, 1) or self.num_shards < 1:
            raise UserError(f"--shard-index must be in [0, --num-shards), got {self.shard_index} of {self.num_shards}")
        self.template_kwargs()  # a bad --chat-template-kwargs fails here, before any work
        for name in ("tokens_per_batch", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    def template_kwargs(self) -> dict:
        """--chat-template-kwargs as a dict ({} when not given)."""
        if self.chat_template_kwargs is None:
            return {}
        try:
            value = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise UserError(f"--chat-template-kwargs: not JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(value, dict):
            raise UserError(f"--chat-template-kwargs: expected a JSON object, got {self.chat_template_kwargs!r}")
        taken = sorted(RESERVED_TEMPLATE_ARGUMENTS & value.keys())
        if taken:
            raise UserError(f"--chat-template-kwargs: {', '.join(taken)} is set by mlx-dpo itself")
        return value
