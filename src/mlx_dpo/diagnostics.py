"""Data diagnostics for `cache inspect`: what in the preference data DPO may learn besides the preference.

Per split, over every (chosen, rejected_k) comparison (one per row when K = 1):
- length bias: how often chosen has more / fewer tokens than rejected (token ids before truncation), and the
  mean difference; DPO is known to learn answer length when chosen answers are mostly longer;
- repeated prompts: prompts (token ids) in more than one row, rows repeating a whole pair, and valid
  prompts that also occur in train (held-out pairs that are not held out);
- near-identical answers: comparisons whose answers differ in at most FEW_TOKENS tokens once their common
  first and last tokens are removed;
- the reference's mean log-prob per token of chosen vs rejected answers.
Each comes with a one-line reading. Reads files only: no mlx."""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .schemas import Manifest

FEW_TOKENS = 3  # "differ by only a few tokens"
LENGTH_BIAS = 0.6  # share of comparisons with the longer (or shorter) chosen answer called a bias
PER_TOKEN_SAME = 0.05  # nats per token within which the reference has no preference
_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps",
            "n_chosen_tokens", "n_rejected_tokens")


@dataclass
class SplitDiagnostics:
    comparisons: int = 0
    chosen_longer: int = 0
    chosen_shorter: int = 0
    length_difference: float = 0.0  # mean chosen - rejected tokens
    prompts: Counter = field(default_factory=Counter)  # prompt token ids (bytes) -> rows
    repeated_pairs: int = 0  # rows whose (prompt, chosen, rejected) appeared in an earlier row
    few_token_pairs: int = 0  # comparisons differing in <= FEW_TOKENS tokens
    chosen_per_token: float = float("nan")  # mean of ref_chosen_logps / n_chosen_tokens
    rejected_per_token: float = float("nan")
    chosen_per_token_higher: int = 0  # comparisons where chosen's per-token log-prob is higher

    @property
    def repeated_prompts(self) -> tuple[int, int, int]:
        """(prompts in more than one row, rows holding them, most rows of one prompt)."""
        counts = [n for n in self.prompts.values() if n > 1]
        return len(counts), sum(counts), max(counts, default=0)


def differing_tokens(a: list[int], b: list[int]) -> int:
    """Tokens of the longer answer left once the common first and last tokens are removed:
    [5, 6, 7, 8] vs [5, 9, 8] -> 2 (6, 7 against 9); [5, 6] vs [5, 6, 7] -> 1."""
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    same = a[:m] == b[:m]
    prefix = m if same.all() else int(np.argmin(same))
    same_end = a[len(a) - m + prefix:][::-1] == b[len(b) - m + prefix:][::-1]  # never overlaps the prefix
    suffix = len(same_end) if same_end.all() else int(np.argmin(same_end))
    return max(len(a), len(b)) - prefix - suffix


def split_diagnostics(shards: list[Path]) -> SplitDiagnostics:
    d = SplitDiagnostics()
    seen_pairs, differences, chosen_pt, rejected_pt = set(), [], [], []
    for shard in shards:
        handle = pq.ParquetFile(shard)
        present = [c for c in _COLUMNS if c in handle.schema_arrow.names]
        for group in range(handle.num_row_groups):  # one row group at a time: bounded memory
            for row in handle.read_row_group(group, columns=present).to_pylist():
                several = bool(row["rejected_ids"]) and isinstance(row["rejected_ids"][0], list)
                rejected = row["rejected_ids"] if several else [row["rejected_ids"]]
                prompt = np.asarray(row["prompt_ids"], np.int32).tobytes()
                d.prompts[prompt] += 1
                key = (prompt, tuple(row["chosen_ids"]), tuple(map(tuple, rejected)))
                d.repeated_pairs += key in seen_pairs
                seen_pairs.add(key)
                for k, answer in enumerate(rejected):
                    differences.append(len(row["chosen_ids"]) - len(answer))
                    d.few_token_pairs += differing_tokens(row["chosen_ids"], answer) <= FEW_TOKENS
                    if "ref_chosen_logps" in row:
                        ref_rejected = row["ref_rejected_logps"][k] if several else row["ref_rejected_logps"]
                        n_rejected = row["n_rejected_tokens"][k] if several else row["n_rejected_tokens"]
                        chosen_pt.append(row["ref_chosen_logps"] / max(row["n_chosen_tokens"], 1))
                        rejected_pt.append(ref_rejected / max(n_rejected, 1))
    differences = np.asarray(differences)
    d.comparisons = len(differences)
    d.chosen_longer, d.chosen_shorter = int(np.sum(differences > 0)), int(np.sum(differences < 0))
    d.length_difference = float(differences.mean()) if len(differences) else 0.0
    if chosen_pt:
        d.chosen_per_token, d.rejected_per_token = float(np.mean(chosen_pt)), float(np.mean(rejected_pt))
        d.chosen_per_token_higher = int(np.sum(np.asarray(chosen_pt) > np.asarray(rejected_pt)))
    return d


def readings(d: SplitDiagnostics, train_prompts: Counter | None = None) -> list[tuple[str, str, str]]:
    """(topic, the numbers, one-line reading) for one split; `train_prompts` (for the valid split) counts
    held-out prompts that also occur in train."""
    n = max(d.comparisons, 1)
    longer, shorter = d.chosen_longer / n, d.chosen_shorter / n
    if longer >= LENGTH_BIAS:
        length = "chosen answers are mostly longer: DPO can learn to write longer rather than better (watch answer " \
                 "lengths in `report --samples`; --ld-alpha weighs the extra tokens less)"
    elif shorter >= LENGTH_BIAS:
        length = "chosen answers are mostly shorter: DPO can learn to write shorter rather than better"
    else:
        length = "no strong length bias"
    rows = [("length bias", f"chosen longer in {d.chosen_longer:,} of {d.comparisons:,} pairs ({longer:.1%}), shorter in "
             f"{d.chosen_shorter:,} ({shorter:.1%}); chosen - rejected {d.length_difference:+.1f} tokens on average",
             length)]

    prompts, prompt_rows, most = d.repeated_prompts
    numbers = f"{prompts:,} prompts occur more than once ({prompt_rows:,} rows, at most {most:,} times); " \
              f"{_rows(d.repeated_pairs)} repeating an earlier pair exactly"
    if d.repeated_pairs:
        reading = "repeated pairs count several times in training and evaluation; deduplicate them unless intended"
    elif prompts:
        reading = "several answers to one prompt are fine; the pairs of one prompt are not independent samples"
    else:
        reading = "every prompt occurs once"
    if train_prompts is not None:
        leaked = sum(count for prompt, count in d.prompts.items() if prompt in train_prompts)
        numbers += f"; {_rows(leaked)} with a prompt that is also in train"
        if leaked:
            reading = "held-out rows whose prompt is in train measure memory more than generalisation; " + reading
    rows.append(("repeated prompts", numbers, reading))

    few = d.few_token_pairs
    rows.append(("small differences", f"{few:,} pair{'s' if few != 1 else ''} ({few / n:.1%}) whose answers differ in at most {FEW_TOKENS} "
                 "tokens after their common start and end",
                 "the preference rests on a few tokens (a fact, a name, a number): check they are real corrections, "
                 "not noise or formatting" if few else "no pair turns on only a few tokens"))

    if np.isfinite(d.chosen_per_token):
        gap = d.chosen_per_token - d.rejected_per_token
        if abs(gap) < PER_TOKEN_SAME:
            reading = "the reference finds chosen and rejected answers about equally likely per token"
        elif gap > 0:
            reading = "the reference already favours the chosen answers' tokens: they are close to what it writes"
        else:
            reading = "the chosen answers are less likely for the reference than the rejected ones: unlike what it " \
                      "writes, so DPO has more to change (watch logps/chosen)"
        rows.append(("reference per token", f"chosen {d.chosen_per_token:.3f}, rejected {d.rejected_per_token:.3f} "
                     f"nats/token on average; chosen higher in {d.chosen_per_token_higher:,} pairs "
                     f"({d.chosen_per_token_higher / n:.1%})", reading))
    return rows


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def diagnostics_lines(cache: Path, m: Manifest) -> list[str]:
    """The `Data diagnostics` section of `cache inspect`."""
    lines, found = ["Data diagnostics (over every chosen/rejected pair)"], {}
    for split in sorted(m.splits, key=lambda name: name != "train"):  # train first: valid prompts are checked against it
        info = m.splits[split]
        if info.rows_cached == 0:
            continue
        found[split] = split_diagnostics([cache / s.path for s in info.shards])
        train = found["train"].prompts if split != "train" and "train" in found else None
        for topic, numbers, reading in readings(found[split], train):
            lines += [f"  {split} {topic}: {numbers}", f"    -> {reading}"]
    return lines + [""]
