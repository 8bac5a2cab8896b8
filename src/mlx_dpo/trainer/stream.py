"""④ Parquet shards -> bounded shuffle buffer -> length-bucketed, padded batches.

Memory is bounded by the shuffle buffer (rows), not by the cache size. The order depends only on
the seed and the epoch, so a run can resume by skipping the batches it already consumed.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..logps import collate_pairs
from ..schemas.sequence import pair_length

ROW_COLUMNS = ["index", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
TAIL_COLUMNS = ["ref_chosen_tail_logps", "ref_rejected_tail_logps"]  # LD-DPO; K = 1 caches only


@dataclass
class Batch:
    input_ids: np.ndarray  # ((1+K)B, T) int32: chosen rows, then the rows of each rejected answer
    completion_mask: np.ndarray  # ((1+K)B, T) int32
    ref_chosen_logps: np.ndarray  # (B,) float32
    ref_rejected_logps: np.ndarray  # (B,), or (B, K) with K rejected answers per prompt
    indices: np.ndarray  # (B,) input-row indices, for tracing a batch back to the data
    ref_chosen_tail_logps: np.ndarray | None = None  # (B,), with --ld-alpha
    ref_rejected_tail_logps: np.ndarray | None = None


def iter_rows(shards: list[Path], rng: np.random.Generator | None, columns=ROW_COLUMNS) -> Iterator[dict]:
    """Rows of every shard; with `rng`, shards and row groups are visited in random order."""
    shard_order = rng.permutation(len(shards)) if rng is not None else range(len(shards))
    for s in shard_order:
        parquet = pq.ParquetFile(shards[s])
        groups = range(parquet.num_row_groups)
        for g in rng.permutation(len(groups)) if rng is not None else groups:
            yield from parquet.read_row_group(int(g), columns=columns).to_pylist()


class PairStream:
    """Batches of preference pairs from a cache split.

    With `shuffle`, each epoch reads rows in a seeded random order into a buffer of
    `shuffle_buffer` rows, sorts the buffer by length so a batch holds similar lengths (little
    padding), and yields its batches in random order. Without it, rows come sorted by length.
    """

    def __init__(self, shards, *, batch_size, max_length, truncation_mode, pad_id,
                 shuffle=True, seed=0, shuffle_buffer=4096, pad_to_multiple=32, with_tails=False,
                 rank=0, ranks=1):
        self.shards = [Path(s) for s in shards]
        self.batch_size = batch_size
        self.collate = dict(max_length=max_length, truncation_mode=truncation_mode, pad_id=pad_id,
                            pad_to_multiple=pad_to_multiple)
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, max(shuffle_buffer, batch_size)
        self.columns = ROW_COLUMNS + (TAIL_COLUMNS if with_tails else [])
        # Data parallel: every rank forms the same global batches of batch_size x ranks pairs and
        # keeps every ranks-th row of each, so together they train exactly what one process would.
        self.rank, self.ranks = rank, ranks

    def _buffer_batches(self, buffer: list[dict], rng) -> list[list[dict]]:
        buffer.sort(key=pair_length)
        size = self.batch_size * self.ranks
        batches = [buffer[i : i + size] for i in range(0, len(buffer), size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        # A global batch too small to give every rank a row is dropped (only ever the last of a buffer).
        return [b[self.rank :: self.ranks] for b in batches if len(b) >= self.ranks]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        buffer = []
        limit = self.shuffle_buffer if self.shuffle else None
        for row in iter_rows(self.shards, rng, self.columns):
            buffer.append(row)
            if limit is not None and len(buffer) >= limit:
                yield from map(self.make_batch, self._buffer_batches(buffer, rng))
                buffer = []
        if buffer:
            yield from map(self.make_batch, self._buffer_batches(buffer, rng))

    def forever(self, start_epoch: int = 0, skip_batches: int = 0) -> Iterator[tuple[int, Batch]]:
        """(epoch, batch) pairs without end; resumes `skip_batches` into `start_epoch`."""
        epoch = start_epoch
        while True:
            produced = 0
            for i, batch in enumerate(self.epoch(epoch)):
                produced += 1
                if epoch == start_epoch and i < skip_batches:
                    continue
                yield epoch, batch
            if produced == 0:
                raise ValueError("the cache split has no rows to train on")
            epoch += 1

    def make_batch(self, rows: list[dict]) -> Batch:
        input_ids, completion_mask = collate_pairs(rows, **self.collate)
        return Batch(
            input_ids=input_ids,
            completion_mask=completion_mask,
            ref_chosen_logps=np.array([r["ref_chosen_logps"] for r in rows], dtype=np.float32),
            ref_rejected_logps=np.array([r["ref_rejected_logps"] for r in rows], dtype=np.float32),
            indices=np.array([r["index"] for r in rows], dtype=np.int64),
            **{name: np.array([r[name] for r in rows], dtype=np.float32) for name in TAIL_COLUMNS if name in rows[0]},
        )
