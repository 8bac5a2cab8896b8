"""`mlx-dpo report RUN --pairs` and `--samples`: what training did to each held-out pair, and what the
policy now writes. Reads the run's eval_pairs.parquet / samples.jsonl and, to show text, the cache's
token ids decoded with the run's model's tokenizer (files only: no model is loaded)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError, one_line
from ..schemas import read_manifest
from ..trainer.pair_log import EVAL_PAIRS
from ..trainer.samples import SAMPLES
from .report import Run

PAIR_COLUMNS = ("step", "index", "k", "ref_margin", "policy_margin", "reward_margin")  # what the report reads
SAMPLE_FIELDS = ("step", "index", "prompt", "completion")


def shorten(text: str, width: int) -> str:
    """One line of at most `width` characters: whitespace runs collapsed, newlines shown as ⏎."""
    text = " ".join(text.replace("\n", " ⏎ ").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def recorded_identities(config: dict) -> dict[str, str]:
    """Cache path -> the identity the run recorded for it in config.yaml (one cache or a list of them)."""
    caches, identities = config.get("cache"), config.get("cache_identity")
    if isinstance(caches, list) and isinstance(identities, list):
        return {str(c): i for c, i in zip(caches, identities)}
    return {str(caches): identities} if isinstance(identities, str) else {}


class Texts:
    """Decoded prompt/chosen/rejected of valid-split rows, by cache index (and, for a run on several
    caches, by cache: `caches` gives each index's); every method returns None (with `problem` saying
    why) when the cache or the tokenizer cannot be read."""

    def __init__(self, run: Run, indices, caches=None):
        self.problem, self.rows, self.tokenizer = None, {}, None
        cache, model = run.config.get("cache"), run.config.get("model")
        self.default = cache[0] if isinstance(cache, list) and cache else cache  # several: a list
        recorded = recorded_identities(run.config)
        wanted: dict[str, set[int]] = {}
        for position, index in enumerate(indices):
            wanted.setdefault((None if caches is None else caches[position]) or self.default, set()).add(int(index))
        for cache, indices_in in wanted.items():
            try:
                manifest = read_manifest(Path(cache))
                if recorded.get(str(cache)) not in (None, manifest.identity):  # rebuilt since: other pairs
                    self.problem = (f"cache {cache} is now identity {manifest.identity}, the run trained on "
                                    f"{recorded[str(cache)]}")
                    self.rows = {}
                    return
                shards = [Path(cache) / s.path for s in manifest.splits["valid"].shards]
                values = pa.array(sorted(indices_in), pa.int64())
                for shard in shards:
                    table = pq.read_table(shard, columns=["index", "prompt_ids", "chosen_ids", "rejected_ids"])
                    for row in table.filter(pc.is_in(table["index"], value_set=values)).to_pylist():
                        self.rows[(cache, row["index"])] = row
            except (OSError, ValueError, KeyError, TypeError) as error:
                self.problem = one_line(f"cache {cache} unreadable ({error})")
                return
        try:
            from transformers import AutoTokenizer  # the tokenizer mlx-lm loads for this model

            self.tokenizer = AutoTokenizer.from_pretrained(
                str(model), trust_remote_code=bool(run.config.get("trust_remote_code")))
        except Exception as error:  # a missing folder or hub id, offline: show numbers without text
            self.problem = f"tokenizer of {model} not loadable ({type(error).__name__})"

    def row(self, index: int, cache: str | None = None) -> dict | None:
        return self.rows.get((cache or self.default, int(index)))

    def decode(self, index: int, column: str, k: int = 0, cache: str | None = None) -> str | None:
        row = self.row(index, cache)
        if row is None or self.tokenizer is None:
            return None
        ids = row[column]
        if column == "rejected_ids" and ids and isinstance(ids[0], list):  # K rejected answers
            ids = ids[k]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def read_pairs(run: Run) -> pa.Table:
    path = run.path / EVAL_PAIRS
    if not path.is_file():
        raise UserError(f"{run.path}: no {EVAL_PAIRS} (written by `mlx-dpo train` at each evaluation; "
                        "the run needs a cache with a valid split)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: not a readable parquet file ({' '.join(str(error).split())})") from error
    if missing := [c for c in PAIR_COLUMNS if c not in table.column_names]:
        raise UserError(f"{path}: no column {', '.join(missing)} (written by `mlx-dpo train`: {', '.join(PAIR_COLUMNS)})")
    return table


def last_evaluation(table: pa.Table) -> dict[str, np.ndarray]:
    """The rows of the last evaluated step, with before (reference) and now (policy) margins."""
    step = pc.max(table["step"]).as_py()
    rows = table.filter(pc.equal(table["step"], step))
    columns = {name: rows[name].to_numpy() for name in rows.column_names}
    columns["change"] = columns["policy_margin"] - columns["ref_margin"]
    return columns


def pairs_summary(run: Run, label: str, top: int = 3, width: int = 100) -> str:
    table = read_pairs(run)
    if table.num_rows == 0:
        return f"{label}: {EVAL_PAIRS} holds no evaluated pairs"
    last = last_evaluation(table)
    several = int(last["k"].max()) > 0
    n, step = len(last["index"]), int(last["step"][0])
    before, now, moved = last["ref_margin"] > 0, last["policy_margin"] > 0, last["reward_margin"] > 0
    unit = "comparisons (pair, rejected answer)" if several else "held-out pairs"
    lines = [
        f"{label}: {n:,} {unit}, evaluated at steps {sorted(set(table['step'].to_pylist()))}",
        f"  prefers chosen (margin > 0): before (reference) {before.sum():,} of {n:,} ({before.mean():.1%})"
        f"  ->  step {step}: {now.sum():,} ({now.mean():.1%})",
        f"  flipped to chosen {np.sum(~before & now):,}, flipped to rejected {np.sum(before & ~now):,}; "
        f"unchanged: {np.sum(before & now):,} right, {np.sum(~before & ~now):,} wrong",
        f"  moved towards chosen (reward margin > 0, as rewards/accuracies counts): {np.sum(moved):,} "
        f"({moved.mean():.1%})",
    ]
    order = np.argsort(last["change"], kind="stable")
    picked = np.r_[order[:top], order[-top:]]
    caches = last.get("cache")  # a run on several caches names each pair's
    texts = Texts(run, last["index"][picked], None if caches is None else caches[picked])
    worst = "most worsened" if last["change"][order[0]] < 0 else "least improved (none worsened)"
    for title, picks in (("most improved", order[::-1][:top]), (worst, order[:top])):
        lines.append(f"  {title} (policy margin - reference margin, nats):")
        for i in picks:
            k = int(last["k"][i])
            cache = None if caches is None else caches[i]
            name = (f"{cache} " if cache else "") + f"index {last['index'][i]}" + (f" k={k}" if several else "")
            lines.append(f"    {last['change'][i]:+9.3f}  {name}: margin {last['ref_margin'][i]:+.3f} -> "
                         f"{last['policy_margin'][i]:+.3f}")
            for column, tag in (("prompt_ids", "prompt"), ("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
                text = texts.decode(last["index"][i], column, k, cache)
                if text is not None:
                    lines.append(f"{'':14}{tag:<9} {shorten(text, width - 24)}")
    if texts.problem:
        lines.append(f"  (answers not shown: {texts.problem})")
    return "\n".join(lines)


def plot_pairs(runs: list[Run], labels: list[str], out: str):
    """Per run: margins before (reference) vs now (last evaluation), and the histogram of their change."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise UserError("report --out needs matplotlib: pip install 'mlx-dpo[report]'") from error

    figure = Figure(figsize=(12, 5 * len(runs)), layout="constrained")
    axes = figure.subplots(len(runs), 2, squeeze=False)
    for (scatter, hist), run, label in zip(axes, runs, labels):
        last = last_evaluation(read_pairs(run))
        x, y = last["ref_margin"], last["policy_margin"]
        colours = np.where((x <= 0) & (y > 0), "tab:green", np.where((x > 0) & (y <= 0), "tab:red", "tab:grey"))
        scatter.scatter(x, y, s=12, c=colours, alpha=0.7)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        scatter.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle=":")  # unchanged
        scatter.axhline(0, color="black", linewidth=0.5)
        scatter.axvline(0, color="black", linewidth=0.5)
        scatter.set_xlabel("reference margin: log p(chosen) - log p(rejected)")
        scatter.set_ylabel(f"policy margin at step {int(last['step'][0])}")
        scatter.set_title(f"{label}: green flipped to chosen, red to rejected")
        hist.hist(last["change"], bins=40, color="tab:blue")
        hist.axvline(0, color="black", linewidth=0.8)
        hist.set_xlabel("change of margin (policy - reference), nats")
        hist.set_ylabel("pairs")
        hist.set_title(f"{label}: {np.mean(last['change'] > 0):.0%} of pairs moved towards chosen")
        for ax in (scatter, hist):
            ax.grid(alpha=0.3)
    figure.savefig(out, dpi=80)
    return figure


def read_samples(run: Run) -> list[dict]:
    path = run.path / SAMPLES
    if not path.is_file():
        raise UserError(f"{run.path}: no {SAMPLES} (train with --eval-generate N to write the policy's answers)")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON line ({error})") from error
        if not isinstance(sample, dict) or (missing := [k for k in SAMPLE_FIELDS if k not in sample]):
            what = ", ".join(missing) if isinstance(sample, dict) else "any (not an object)"
            raise UserError(f"{path}:{number}: no field {what} (each line has {', '.join(SAMPLE_FIELDS)})")
        samples.append(sample)
    return samples


def _side_by_side(left_title, left, right_title, right, width, max_lines: int = 4) -> list[str]:
    column = (width - 3) // 2

    def wrap(text):
        lines = textwrap.wrap(shorten(text or "(empty)", column * max_lines), column, max_lines=max_lines,
                              placeholder=" …")
        return lines or [""]

    left_lines, right_lines = wrap(left), wrap(right)
    rows = [(left_title, right_title)] + list(zip(left_lines + [""] * (len(right_lines) - len(left_lines)),
                                                  right_lines + [""] * (len(left_lines) - len(right_lines))))
    return [f"    {a:<{column}} | {b}".rstrip() for a, b in rows]


def samples_summary(run: Run, label: str, width: int = 110) -> str:
    samples = read_samples(run)
    if not samples:
        return f"{label}: {SAMPLES} is empty"
    steps = sorted({s["step"] for s in samples})
    first, last = ({s["index"]: s for s in samples if s["step"] == step} for step in (steps[0], steps[-1]))
    texts = Texts(run, list(first), [s.get("cache") for s in first.values()])
    lines = [f"{label}: greedy answers to {len(first)} held-out prompts, step {steps[0]} -> step {steps[-1]}"]
    for index, early in first.items():
        late = last.get(index, {})
        cache = early.get("cache")  # a run on several caches: the one the prompts are from
        prompt = texts.decode(index, "prompt_ids", cache=cache) or early["prompt"]
        lines += ["", f"  {cache + ' ' if cache else ''}index {index}  prompt: {shorten(prompt, width - 20)}"]
        lines += _side_by_side(f"step {steps[0]}", early["completion"], f"step {steps[-1]}", late.get("completion"),
                               width)
        chosen, rejected = texts.decode(index, "chosen_ids", cache=cache), texts.decode(index, "rejected_ids", cache=cache)
        if chosen is not None:
            several = isinstance(texts.row(index, cache)["rejected_ids"][0], list)
            lines += _side_by_side("chosen", chosen, "rejected (the first)" if several else "rejected", rejected, width)
    if texts.problem:
        lines.append(f"  (chosen and rejected not shown: {texts.problem})")
    return "\n".join(lines)
