"""④ Parquet shards -> bounded shuffle buffer -> length-bucketed, padded global batches -> shares.

Memory is bounded by the shuffle buffer (rows), not by the cache size. The order depends only on
the seed and the epoch, so a run can resume by skipping the steps it already consumed.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import UserError
from ..logps import collate_pairs, score_plan
from ..prompt_once import collate_prompt_once
from ..schemas.sequence import pair_length
from ..schemas.verify import first_non_finite
from ..shapes import SCORE_MULTIPLE, SCORE_RATIO, WIDTH_MULTIPLE, WIDTH_RATIO
from .mixture import epoch_quotas, mixed_rows, rows_in

# The length-order jitter spans this many global batches: a row's neighbours change between epochs even
# when the buffer holds only a few batches, at a padding cost of a few points (README: Training).
JITTER_BATCHES = 4
ROW_COLUMNS = ["index", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
TAIL_COLUMNS = ["ref_chosen_tail_logps", "ref_rejected_tail_logps"]  # LD-DPO; K = 1 caches only


@dataclass
class Batch:
    input_ids: np.ndarray  # ((1+K)B, T) int32: chosen rows, then the rows of each rejected answer
    completion_mask: np.ndarray  # ((1+K)B, T) int32
    ref_chosen_logps: np.ndarray  # (B,) float32
    ref_rejected_logps: np.ndarray  # (B,), or (B, K) with K rejected answers per prompt
    indices: np.ndarray  # (B,) input-row indices, for tracing a batch back to the data
    weights: np.ndarray  # (B,) float32: 1, or 0 for a stand-in row (a rank left without rows, a filler to batch_size)
    plan: np.ndarray  # (4, M) int32: where the scored tokens are (mlx_dpo.logps.score_plan)
    ref_chosen_tail_logps: np.ndarray | None = None  # (B,), with --ld-alpha
    ref_rejected_tail_logps: np.ndarray | None = None
    caches: np.ndarray | None = None  # (B,) int64: which --cache each pair is from, with several caches
    pairs_per_cache: np.ndarray | None = None  # (caches,) float64: pairs of weight > 0 from each, with several
    # The prompt once per pair (mlx_dpo.prompt_once): (B, P) int32, input_ids/completion_mask then hold the answer rows
    prompt_ids: np.ndarray | None = None
    prompt_mask: np.ndarray | None = None

    def counts(self) -> np.ndarray:
        """[pairs, scored chosen completion tokens] (float64): what a step's loss is normalised by."""
        pairs = len(self.indices)
        chosen_tokens = self.completion_mask[:pairs, 1:].sum(axis=1)  # as sequence_logps scores them
        return np.array([self.weights.sum(), (self.weights * chosen_tokens).sum()], dtype=np.float64)

    def real_indices(self) -> list[int]:
        return [int(i) for i, w in zip(self.indices, self.weights) if w > 0]


def iter_rows(shards: list[Path], rng: np.random.Generator | None, columns=ROW_COLUMNS, skip: int = 0) -> Iterator[dict]:
    """Rows of every shard; with `rng`, shards and row groups are visited in random order; the first
    `skip` rows of that order are passed over (whole row groups without reading them).
    Raises UserError naming file, row and column if a cached reference value is not finite."""
    shard_order = rng.permutation(len(shards)) if rng is not None else range(len(shards))
    for s in shard_order:
        parquet = pq.ParquetFile(shards[s])
        groups = range(parquet.num_row_groups)
        for g in rng.permutation(len(groups)) if rng is not None else groups:
            if skip >= (rows := parquet.metadata.row_group(int(g)).num_rows):
                skip -= rows
                continue
            table = parquet.read_row_group(int(g), columns=columns)
            _check_finite(table, shards[s], sum(parquet.metadata.row_group(k).num_rows for k in range(g)))
            yield from table.slice(skip).to_pylist()
            skip = 0


def _check_finite(table, shard: Path, first_row: int) -> None:
    """A NaN or inf reference log-prob is a damaged cache (precompute never writes one): stop at it
    rather than train on it. One vectorised check per row group."""
    if (found := first_non_finite(table)) is None:
        return
    name, row, value = found
    cache = shard.parent.parent if (shard.parent.parent / "manifest.json").exists() else shard.parent
    raise UserError(f"{shard}: row {first_row + row} (index {table['index'][row].as_py()}): {name} is "
                    f"{value}, not finite; the cache is damaged: run "
                    f"`mlx-dpo cache verify {cache}`, then rebuild it with `mlx-dpo precompute --overwrite`")


def split_evenly(rows: list, parts: int) -> list[list]:
    """`parts` contiguous runs of `rows` whose sizes differ by at most one (some empty if too few rows)."""
    bounds = [round(i * len(rows) / parts) for i in range(parts + 1)]
    return [rows[a:b] for a, b in zip(bounds, bounds[1:])]


def filled(rows: list[dict], fill: int, spare: list[dict] | None = None) -> tuple[list[dict], list[float]]:
    """`rows` (weight 1) filled up to `fill` pairs with copies of weight 0 of the shortest of `rows` (or of
    `spare` when `rows` is empty), and their weights: the copies change no sum and add no width."""
    stand_in = min(rows or spare, key=pair_length)
    weights = [1.0] * len(rows) + [0.0] * max(fill - len(rows), 0)
    return rows + [stand_in] * (len(weights) - len(rows)), weights


class PairStream:
    """Steps of preference pairs from a cache split, or from the same split of several caches.

    A step is one global batch of batch_size x ranks x micro_batches pairs; each rank gets its
    micro_batches shares of it. With `shuffle`, each epoch reads rows in a seeded random order into a
    buffer of `shuffle_buffer` rows, orders the buffer by length with a seeded jitter of up to
    JITTER_BATCHES global batches (similar lengths share a batch, little padding, and a row's batch
    mates change between epochs even when the buffer holds only a few batches),
    and yields its global batches in random order. Without it, rows come sorted by length within each
    buffer. The last global batch of a buffer may be smaller; no row is dropped or repeated.

    `shards` is one cache's shard list, or a list of several caches' lists. Several caches shuffled
    read the seeded weighted interleave of mlx_dpo.trainer.mixture (`weights`: None for their sizes);
    unshuffled, the caches one after the other. Their batches say which cache each pair is from.

    Shapes (what the compiled step traces once each, mlx_dpo.shapes): widths are rounded up to the
    ladder of `pad_to_multiple` and `pad_ratio`, scored positions to that of `score_multiple` and
    `score_ratio`; with `fixed_rows`, a micro-batch of fewer than `batch_size` pairs is filled up
    with copies of its shortest pair of weight 0, so every micro-batch has the same number of rows.

    With `prompt_once`, batches are laid out once per pair (collate_prompt_once), or as plain
    prompt+answer rows where that layout does not apply (truncation cut a pair's prompts differently).
    """

    def __init__(self, shards, *, batch_size, max_length, truncation_mode, pad_id,
                 shuffle=True, seed=0, shuffle_buffer=4096, pad_to_multiple=WIDTH_MULTIPLE, pad_ratio=WIDTH_RATIO,
                 score_multiple=SCORE_MULTIPLE, score_ratio=SCORE_RATIO, fixed_rows=False, with_tails=False,
                 rank=0, ranks=1, micro_batches=1, weights=None, prompt_once=False):
        self.several = len(shards) > 0 and isinstance(shards[0], (list, tuple))  # caches, even if one
        self.sources = [[Path(s) for s in cache] for cache in shards] if self.several else [[Path(s) for s in shards]]
        self.shards = [s for cache in self.sources for s in cache]
        if self.several:
            self.sizes = [rows_in(cache) for cache in self.sources]
            self.quotas = epoch_quotas(self.sizes, weights)
        self.batch_size, self.micro_batches, self.fixed_rows = batch_size, micro_batches, fixed_rows
        self.global_size = batch_size * ranks * micro_batches
        self.collate = dict(max_length=max_length, truncation_mode=truncation_mode, pad_id=pad_id,
                            pad_to_multiple=pad_to_multiple, pad_ratio=pad_ratio)
        self.score = dict(multiple=score_multiple, ratio=score_ratio)
        self.prompt_once = prompt_once
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, max(shuffle_buffer, self.global_size)
        self.columns = ROW_COLUMNS + (TAIL_COLUMNS if with_tails else [])
        # Data parallel: every rank forms the same global batches and keeps its shares of each, so
        # together they train exactly what one process would.
        self.rank, self.ranks = rank, ranks

    def _global_batches(self, buffer: list[dict], rng) -> list[list[dict]]:
        buffer.sort(key=pair_length)
        if rng is not None:  # move each row by up to JITTER_BATCHES global batches: other neighbours every epoch
            jitter = np.arange(len(buffer)) + rng.uniform(0, JITTER_BATCHES * self.global_size, len(buffer))
            buffer = [buffer[i] for i in np.argsort(jitter, kind="stable")]
        size = self.global_size
        batches = [buffer[i : i + size] for i in range(0, len(buffer), size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def local_batches(self, rows: list[dict]) -> list[Batch]:
        """This rank's micro-batches of one global batch. A share left empty (a global batch smaller
        than micro-batches x ranks) holds a stand-in row of weight 0, so every rank runs every step;
        with fixed_rows, every share is filled up to batch_size pairs that way."""
        shares = split_evenly(rows, self.micro_batches * self.ranks)
        mine = [shares[j * self.ranks + self.rank] for j in range(self.micro_batches)]
        return [self.make_batch(share, fill=self.batch_size if self.fixed_rows else 1, spare=rows) for share in mine]

    def _rows(self, epoch: int, rng) -> Iterator[dict]:
        if not self.several:
            return iter_rows(self.shards, rng, self.columns)
        if rng is None:  # the caches one after the other, each row once
            return ({**row, "cache": i} for i, cache in enumerate(self.sources) for row in iter_rows(cache, None, self.columns))
        return mixed_rows(self.sources, self.sizes, self.quotas, self.seed, epoch, self.columns, iter_rows)

    def epoch(self, epoch: int, keep: set[int] | None = None) -> Iterator[list[Batch]]:
        """Steps of `epoch`; with `keep`, only the rows at those positions of the split's file order
        (with several caches unshuffled: of the caches' rows one after the other)."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        buffer = []
        for position, row in enumerate(self._rows(epoch, rng)):
            if keep is not None and position not in keep:
                continue
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer:
                yield from map(self.local_batches, self._global_batches(buffer, rng))
                buffer = []
        if buffer:
            yield from map(self.local_batches, self._global_batches(buffer, rng))

    def forever(self, start_epoch: int = 0, skip_steps: int = 0) -> Iterator[tuple[int, list[Batch]]]:
        """(epoch, micro-batches of a step) without end; resumes `skip_steps` into `start_epoch`."""
        epoch = start_epoch
        while True:
            produced = 0
            for i, step in enumerate(self.epoch(epoch)):
                produced += 1
                if epoch == start_epoch and i < skip_steps:
                    continue
                yield epoch, step
            if produced == 0:
                raise ValueError("the cache split has no rows to train on")
            epoch += 1

    def make_batch(self, rows: list[dict], fill: int = 1, spare: list[dict] | None = None) -> Batch:
        """The batch of `rows`, filled up to `fill` pairs with stand-ins of weight 0 (see `filled`)."""
        rows, weights = filled(rows, fill, spare)
        once = collate_prompt_once(rows, **self.collate) if self.prompt_once else None
        if once is None:
            once = dict(zip(("input_ids", "completion_mask"), collate_pairs(rows, **self.collate)))
        input_ids, completion_mask = once.pop("input_ids"), once.pop("completion_mask")
        mixture = {}
        if self.several:
            caches = np.array([r["cache"] for r in rows], dtype=np.int64)
            mixture = dict(caches=caches, pairs_per_cache=np.bincount(
                caches, weights=weights, minlength=len(self.sources)).astype(np.float64))
        return Batch(
            input_ids=input_ids,
            completion_mask=completion_mask,
            plan=score_plan(completion_mask, **self.score),
            ref_chosen_logps=np.array([r["ref_chosen_logps"] for r in rows], dtype=np.float32),
            ref_rejected_logps=np.array([r["ref_rejected_logps"] for r in rows], dtype=np.float32),
            indices=np.array([r["index"] for r in rows], dtype=np.int64),
            weights=np.array(weights, dtype=np.float32),
            **{name: np.array([r[name] for r in rows], dtype=np.float32) for name in TAIL_COLUMNS if name in rows[0]},
            **mixture, **once,
        )

    def layout_tokens(self) -> tuple[int, int]:
        """Token positions (padding included) of the batches of epoch 0's first shuffle buffer, laid out
        as plain prompt+answer rows and once per pair: (plain, once). Host-only, from the token ids; over
        every share of the global batches, so every rank finds the same numbers."""
        plain = once = 0
        rng = np.random.default_rng([self.seed, 0]) if self.shuffle else None  # as epoch(0)
        buffer = list(itertools.islice(self._rows(0, rng), self.shuffle_buffer))
        for batch in self._global_batches(buffer, rng):
            for share in split_evenly(batch, self.micro_batches * self.ranks):
                if not share:
                    continue
                share, _ = filled(share, self.batch_size if self.fixed_rows else 1)
                size = collate_pairs(share, **self.collate)[0].size
                layout = collate_prompt_once(share, **self.collate)
                plain += size
                once += size if layout is None else layout["prompt_ids"].size + layout["input_ids"].size
        return plain, once
