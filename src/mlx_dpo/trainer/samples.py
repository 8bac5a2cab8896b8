"""RUN/samples.jsonl (`train --eval-generate N`): what the policy writes for N fixed held-out prompts.

At step 0 and at each evaluation, the policy in memory (adapters applied) answers the first N distinct
prompts of the cache's valid split (lowest `index` first), greedily, through mlx-lm's generation. One JSON line
per (step, prompt): {"step", "index", "prompt", "completion", "finish_reason"}. The prompt goes in as
the cache's own `prompt_ids` (chat template already applied), so the model sees exactly the tokens it
is trained on; `prompt` is their decoding, for reading.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq

from ..schemas.atomic import write_text_atomic

SAMPLES = "samples.jsonl"


def held_out_prompts(shards: list[Path], n: int) -> list[tuple[int, list[int]]]:
    """(index, prompt_ids) of the first `n` distinct prompts in `shards`, by lowest index (a prompt that
    several rows share is asked once; fewer than `n` if the split holds fewer)."""
    rows = []
    for shard in shards:
        rows += pq.read_table(shard, columns=["index", "prompt_ids"]).to_pylist()
    chosen, seen = [], set()
    for row in sorted(rows, key=lambda r: r["index"]):
        if tuple(row["prompt_ids"]) not in seen and len(chosen) < n:
            seen.add(tuple(row["prompt_ids"]))
            chosen.append((row["index"], row["prompt_ids"]))
    return chosen


def generate_samples(model, tokenizer, prompts: list[tuple[int, list[int]]], max_tokens: int) -> list[dict]:
    """Greedy completions (argmax at every step: deterministic) of each prompt, at most `max_tokens`
    tokens, stopping at the tokenizer's end of sequence. `model` should be in eval mode (no dropout)."""
    from mlx_lm.generate import stream_generate

    records = []
    for index, prompt_ids in prompts:
        responses = list(stream_generate(model, tokenizer, list(prompt_ids), max_tokens=max_tokens))
        last = responses[-1]  # carries the token that stopped generation: EOS (dropped) or the max_tokens-th (kept)
        tokens = [r.token for r in responses[:-1]] + ([last.token] if last.finish_reason == "length" else [])
        # Decoded as a whole, not from mlx-lm's streaming pieces (which may drop a leading space).
        records.append({"index": index, "prompt": tokenizer.decode(prompt_ids), "completion": tokenizer.decode(tokens),
                        "finish_reason": last.finish_reason})
    return records


class SampleLog:
    """samples.jsonl, rewritten whole (temp file, fsync, rename) at each evaluation."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SAMPLES

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, step: int, records: list[dict]) -> None:
        kept = [r for r in self.read() if r["step"] != step]  # an evaluation is written once
        self._write(kept + [{"step": step, **r} for r in records])

    def keep_until(self, step: int) -> None:
        """Drop the samples after `step`: a resumed run generates them again."""
        if self.path.exists():
            self._write([r for r in self.read() if r["step"] <= step])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, records: list[dict]) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
