"""What each evaluation leaves beside metrics.jsonl: eval_pairs.parquet (always) and samples.jsonl
(with --eval-generate). Rank 0 writes; every rank takes part in gathering the pairs."""

from pathlib import Path

from ..errors import UserError
from .pair_log import PairCollector, PairLog
from .samples import SampleLog, generate_samples, held_out_prompts


class EvalOutputs:
    def __init__(self, run_dir: Path, valid_shards: list[Path] | None, tokenizer, *, eval_generate: int,
                 eval_max_tokens: int, group, resume_step: int | None, caches: list[str] | None = None,
                 sample_cache: str | None = None):
        """`resume_step`: the checkpoint a resumed run starts from (its later evaluations are dropped,
        to be written again), or None for a new run (earlier files are removed). With several caches,
        `caches` names them (eval_pairs' `cache` column) and `valid_shards` are those of `sample_cache`,
        the first with a valid split: its prompts are the samples', whose lines then name it."""
        if eval_generate and not valid_shards:
            raise UserError("--eval-generate needs a cache with a valid split (its prompts are held out)")
        self.group, self.main = group, group is None or group.rank() == 0
        self.tokenizer, self.max_tokens = tokenizer, eval_max_tokens
        self.pairs, self.samples = PairLog(run_dir, caches), SampleLog(run_dir)
        self.sample_cache = {"cache": sample_cache} if sample_cache else {}
        self.prompts = held_out_prompts(valid_shards, eval_generate) if eval_generate and self.main else []
        if self.main:
            for log in (self.pairs, self.samples):
                log.clear() if resume_step is None else log.keep_until(resume_step)

    def write(self, step: int, model, pairs: PairCollector) -> None:
        """After evaluate(..., on_pairs=pairs.add) at `step`: gather and write the pairs, then generate."""
        columns = pairs.columns(self.group)
        if not self.main:
            return
        self.pairs.append(step, columns)
        if self.prompts:
            records = generate_samples(model, self.tokenizer, self.prompts, self.max_tokens)
            self.samples.append(step, [{**self.sample_cache, **r} for r in records])
