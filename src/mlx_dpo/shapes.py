"""Batch shapes from short ladders, so the compiled train step traces few times per run.

`mx.compile` traces and compiles the step once per distinct set of input shapes: the (rows, width)
of the token arrays and M, the number of scored positions in the plan (logps.score_plan). Rounding
both up to a geometric ladder bounds how many distinct values a run can meet by the logarithm of
their range, not by the range itself, at a cost in padding measured by the bench (README: Training).
"""

import math

# Chosen by the bench (figure 4 and README: Training): per padded token a bench-125m LoRA step costs
# ~5.4 ms, per padded scored position 3.1 ms at V = 32k and 14.6 ms at V = 152k, and a new shape ~0.5 s
# (~5% of a step), so padding is kept near the old x32/x64 rounding while the count of rungs is bounded.
# Token-array widths: multiples of 16, each rung ~6% above the last (16, 32, ..., 256, 272, 304, ...).
WIDTH_MULTIPLE = 16
WIDTH_RATIO = 1.0625
# Scored positions: multiples of 64, each rung ~12% above the last (64, 128, ..., 576, 704, 832, ...).
SCORE_MULTIPLE = 64
SCORE_RATIO = 1.125


def ladder_ceil(n: int, multiple: int, ratio: float = 1.0) -> int:
    """The smallest rung >= n of the ladder that starts at `multiple` and steps to the previous rung
    times `ratio`, rounded up to a multiple of `multiple` (at least one multiple more). Ratio 1 rounds
    n up to a multiple of `multiple`. Example, multiple 32, ratio 1.25: 32, 64, 96, 128, 160, 224, 288, 384.
    """
    if ratio <= 1.0:
        return max(-(-n // multiple), 1) * multiple
    rung = multiple
    while rung < n:
        rung = max(rung + multiple, math.ceil(rung * ratio / multiple) * multiple)
    return rung


def ladder(lowest: int, highest: int, multiple: int, ratio: float) -> list[int]:
    """The rungs a value in [lowest, highest] can be rounded to (ladder_ceil of each)."""
    rungs = [ladder_ceil(lowest, multiple, ratio)]
    while rungs[-1] < highest:
        rungs.append(ladder_ceil(rungs[-1] + 1, multiple, ratio))
    return rungs
