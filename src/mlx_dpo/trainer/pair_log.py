"""RUN/eval_pairs.parquet: what each evaluation measured on every held-out pair.

One row per evaluated (pair, rejected answer) and evaluation step:

  step           int64    the optimizer step the policy had taken (0: before training)
  cache          string   with several --cache only: the cache the pair is from, as given to train
  index          int64    the pair's `index` in the cache's valid split
  k              int32    which rejected answer (0 when the cache has one per prompt)
  ref_margin     float32  reference log p(chosen) - log p(rejected_k), as the loss used it
  policy_margin  float32  the same for the policy at `step`
  reward_margin  float32  chosen reward - rejected reward = β·(policy_margin - ref_margin)

With K rejected answers a pair gives K rows, one per (chosen, rejected_k) comparison, as the logged
metrics count them: the mean of `reward_margin` over a step's rows is its `rewards/margins`, and the
share of rows with `reward_margin > 0` its `rewards/accuracies`. `reward_margin` is the very value the
loss function computed (with --ld-alpha from the length-weighted sums, with --reference-free without
the reference term), so signs agree with the accuracy even at step 0, where margins are rounding noise.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..schemas.atomic import atomic_path

EVAL_PAIRS = "eval_pairs.parquet"
SCHEMA = pa.schema([
    ("step", pa.int64()), ("index", pa.int64()), ("k", pa.int32()),
    ("ref_margin", pa.float32()), ("policy_margin", pa.float32()), ("reward_margin", pa.float32()),
])
_VALUES = ("ref_margin", "policy_margin", "reward_margin")


def pair_columns(indices: np.ndarray, values: dict, weights: np.ndarray | None = None,
                 caches: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Flat per-(pair, k) columns from one batch. `indices` (B,); `values` holds mx or numpy arrays from
    the loss function: policy_chosen, ref_chosen (B,); policy_rejected, ref_rejected, reward_margin (B,)
    or (B, K); `caches` (B,) the cache number of each pair (several caches), else None. Pairs of weight 0
    (stand-in rows that only keep a rank in step) are left out."""
    v = {name: np.asarray(a, dtype=np.float32) for name, a in values.items()}
    rejected_shape = v["policy_rejected"].shape
    k = rejected_shape[1] if len(rejected_shape) == 2 else 1

    def per_comparison(chosen, rejected):  # (B,) - (B, K) -> (B*K,), row-major: pair, then k
        return (chosen.reshape(-1, 1) - rejected.reshape(len(chosen), -1)).reshape(-1)

    columns = {
        "index": np.repeat(np.asarray(indices, dtype=np.int64), k),
        "k": np.tile(np.arange(k, dtype=np.int32), len(indices)),
        "ref_margin": per_comparison(v["ref_chosen"], v["ref_rejected"]),
        "policy_margin": per_comparison(v["policy_chosen"], v["policy_rejected"]),
        "reward_margin": v["reward_margin"].reshape(-1),
    }
    if caches is not None:
        columns["cache"] = np.repeat(np.asarray(caches, dtype=np.int64), k)
    if weights is None:
        return columns
    real = np.repeat(np.asarray(weights) > 0, k)
    return {name: values[real] for name, values in columns.items()}


class PairCollector:
    """Collects pair_columns batch by batch (pass `add` as evaluate's on_pairs)."""

    def __init__(self, several_caches: bool = False):
        self.parts: list[dict[str, np.ndarray]] = []
        self.several = several_caches

    def add(self, indices, values, weights=None, caches=None) -> None:
        self.parts.append(pair_columns(indices, values, weights, caches))

    def columns(self, group=None) -> dict[str, np.ndarray]:
        """All rows of this evaluation, gathered from every rank (every rank must call this), sorted by
        ([cache,] index, k) so that 1 and N ranks give the same file; `cache` holds cache numbers."""
        names = (*(("cache",) if self.several else ()), "index", "k", *_VALUES)
        local = {n: np.concatenate([p[n] for p in self.parts]) if self.parts else
                 np.zeros(0, np.int64 if n == "cache" else SCHEMA.field(n).type.to_pandas_dtype())
                 for n in names}  # a rank with no batch
        columns = _gather(local, group)
        order = np.lexsort((columns["k"], columns["index"], *([columns["cache"]] if self.several else [])))
        return {n: columns[n][order] for n in names}


def _gather(columns: dict[str, np.ndarray], group) -> dict[str, np.ndarray]:
    """Concatenate each rank's rows on every rank. Ranks may hold different row counts, and
    all_gather needs equal shapes: gather the counts, pad to the largest, gather, cut."""
    if group is None or group.size() == 1:
        return columns
    import mlx.core as mx

    ranks, rank = group.size(), group.rank()
    rows = len(columns["index"])
    counts = np.zeros(ranks, np.int32)
    counts[rank] = rows
    counts = np.array(mx.distributed.all_sum(mx.array(counts), group=group, stream=mx.cpu))
    width = int(counts.max())
    gathered = {}
    for name, values in columns.items():
        padded = np.zeros(width, values.dtype)
        padded[:rows] = values
        whole = np.array(mx.distributed.all_gather(mx.array(padded), group=group, stream=mx.cpu))
        gathered[name] = np.concatenate([whole[r * width : r * width + counts[r]] for r in range(ranks)])
    return gathered


class PairLog:
    """RUN/eval_pairs.parquet, rewritten whole (temp file, fsync, rename) at each evaluation, so a reader
    or a crash never sees a partial file."""

    def __init__(self, run_dir: Path, caches: list[str] | None = None):
        """`caches`: with several caches, their names for the `cache` column (by cache number)."""
        self.path = Path(run_dir) / EVAL_PAIRS
        self.caches = caches
        self.schema = SCHEMA if caches is None else SCHEMA.insert(1, pa.field("cache", pa.string()))

    def read(self) -> pa.Table:
        return pq.read_table(self.path) if self.path.exists() else self.schema.empty_table()

    def append(self, step: int, columns: dict[str, np.ndarray]) -> None:
        rows = len(columns["index"])
        if self.caches is not None:
            columns = {**columns, "cache": [self.caches[i] for i in columns["cache"]]}
        new = pa.table({"step": np.full(rows, step, np.int64), **columns}, schema=self.schema)
        table = self.read()
        table = table.filter(pc.not_equal(table["step"], step))  # an evaluation is written once
        self._write(pa.concat_tables([table, new]))

    def keep_until(self, step: int) -> None:
        """Drop the evaluations after `step`: a resumed run evaluates them again."""
        if self.path.exists():
            table = self.read()
            self._write(table.filter(pc.less_equal(table["step"], step)))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, table: pa.Table) -> None:
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
