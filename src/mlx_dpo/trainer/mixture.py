"""Several caches in one run (`train --cache A --cache B [--cache-weights 0.7,0.3]`).

An epoch of a mixture holds as many rows as the caches' train splits together (N = Σ n_i); cache i
gives quota_i of them: its weight's share of N, rounded so the quotas sum to N (largest remainders).
The default weights are the caches' sizes, so quota_i = n_i: plain concatenation. Which cache each of
the epoch's N rows comes from is a seeded permutation of the quotas (a weighted interleave), and each
cache gives its rows in its own endless seeded order: a pass over its shards and row groups in random
order, then another pass, and so on, continuing across epochs, so a cache drawn above its size repeats
rows and one drawn below it reaches every row over the following epochs. Everything depends only on
the seed and the epoch, which is what lets --resume regenerate an epoch and skip its first steps.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import UserError
from ..schemas.identity import describe_difference, reference_fields

# Seeds of the mixture's own draws, apart from the stream's [seed, epoch] and evaluation's [seed, 1].
MIX_TAG = 0x6D6978


def parse_cache_weights(text: str | None, caches: int) -> list[float] | None:
    """--cache-weights as floats (None when not given). Raises UserError, in one line, on weights for a
    single --cache (they would change nothing), a count other than one per --cache, a value that is not
    a finite number, a negative value or all zeros."""
    if text is None:
        return None
    if caches == 1:
        raise UserError(f"--cache-weights {text}: one --cache has nothing to weigh against; the weights share "
                        "each epoch among several --cache (leave --cache-weights out, or add a --cache)")
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != caches:
        raise UserError(f"--cache-weights {text}: {len(parts)} weight{'s' * (len(parts) != 1)} for {caches} "
                        f"--cache; give one per --cache, in the same order")
    weights = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--cache-weights {text}: {part!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--cache-weights {text}: {part} is not a weight (a finite number >= 0)")
        weights.append(value)
    if sum(weights) == 0:
        raise UserError(f"--cache-weights {text}: all weights are 0; at least one cache needs a positive weight")
    return weights


def epoch_quotas(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Rows each cache gives per epoch: sizes (default weights) or the weights' shares of sum(sizes),
    floored, the rows left over going to the largest remainders (the first cache on a tie)."""
    if weights is None:
        return list(sizes)
    total, mass = sum(sizes), sum(weights)
    exact = [total * w / mass for w in weights]
    quotas = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def rows_in(shards: list[Path]) -> int:
    return sum(pq.ParquetFile(s).metadata.num_rows for s in shards)


def cache_order(shards: list[Path], seed: int, cache: int, start: int, size: int, columns, iter_rows) -> Iterator[dict]:
    """Cache `cache`'s endless seeded order from position `start`: pass p (of `size` rows) visits the
    shards and row groups as iter_rows does with rng [seed, MIX_TAG, 1 + cache, p]."""
    passes, skip = divmod(start, size)
    while True:
        rng = np.random.default_rng([seed, MIX_TAG, 1 + cache, passes])
        yield from iter_rows(shards, rng, columns, skip=skip)
        passes, skip = passes + 1, 0


def mixed_rows(sources: list[list[Path]], sizes: list[int], quotas: list[int], seed: int, epoch: int,
               columns, iter_rows) -> Iterator[dict]:
    """The sum(quotas) rows of mixture epoch `epoch`, each tagged with its cache number as row["cache"]."""
    slots = np.repeat(np.arange(len(quotas), dtype=np.int32), quotas)  # 4 bytes a row: the only per-row memory
    owners = np.random.default_rng([seed, MIX_TAG, 0, epoch]).permutation(slots)
    orders = [cache_order(shards, seed, i, epoch * quota, size, columns, iter_rows) if quota else None
              for i, (shards, size, quota) in enumerate(zip(sources, sizes, quotas))]
    for owner in owners:
        row = next(orders[owner])
        row["cache"] = int(owner)
        yield row


def check_mixable(manifests: list, caches: list[str]) -> None:
    """Caches trained together must score a row the same way: the same reference identity
    (schemas.identity.reference_fields) and the same number of rejected answers per prompt.
    Raises UserError naming the first cache that differs from the first, the field and both values."""
    first, name = manifests[0], caches[0]
    for manifest, other in zip(manifests[1:], caches[1:]):
        difference = describe_difference(reference_fields(first.identity_fields), reference_fields(manifest.identity_fields),
                                         current_name=other, cached_name=name)
        if not difference and manifest.rejected_per_prompt != first.rejected_per_prompt:
            difference = (f"rejected answers per prompt differ: {name} {first.rejected_per_prompt}, "
                          f"{other} {manifest.rejected_per_prompt}")
        if difference:
            raise UserError(f"--cache {other} cannot be trained with --cache {name}: not the same reference "
                            f"({difference}); a mixture needs caches precomputed with one reference and options")


def mixture_summary(caches: list[str], sizes: list[int], quotas: list[int]) -> str:
    """One log line: each cache's train pairs and its draws per epoch."""
    parts = [f"{quota:,} from {cache} (of its {size:,})" for cache, size, quota in zip(caches, sizes, quotas)]
    return f"Mixture of {len(caches)} caches: each epoch of {sum(quotas):,} pairs draws " + ", ".join(parts)
