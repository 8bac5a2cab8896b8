"""Shared by every bench process: where files go, the shapes of each mode, how a task reports.

A task runs in its own process (clean peak memory and max RSS), prints one line
`BENCH_RESULT {json}` last, and the orchestrator (run.py) collects it. Nothing here imports mlx.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"  # models, data, caches, runs: rebuilt on demand, never committed
PEER_VENV = BENCH / ".venv-peers"  # mlx-lm-lora lives here, never in the project's requirements
MARK = "BENCH_RESULT "

LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
SHAPE_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048)
SHAPE_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=512)
MODES = {
    "full": dict(
        models={"bench-125m": dict(SHAPE_125M, vocab_size=32000), "bench-vocab": dict(SHAPE_125M, vocab_size=151936)},
        prompt_mean=64, response_mean=128, precompute_pairs=96, step_pairs=4,
        warmup_steps=1, measured_steps=3, matmul_sizes=[1024, 2048], logps_seq=1024, lse_rows=1700,
        padding_pairs=20000, variants_batch=[8, 256], variants_reps=3,
        smollm2=True,  # the real SmolLM2-135M-Instruct (mlx_dpo.smollm2) beside the random-init shapes
    ),
}
# Small shapes and few steps: checks the whole harness in < 3 minutes; its numbers mean little.
MODES["quick"] = dict(
    MODES["full"],
    models={"bench-125m": dict(SHAPE_SMALL, vocab_size=8000), "bench-vocab": dict(SHAPE_SMALL, vocab_size=32000)},
    prompt_mean=32, response_mean=64, precompute_pairs=24, measured_steps=2, matmul_sizes=[512, 1024],
    logps_seq=256, lse_rows=400, padding_pairs=4000, variants_batch=[8, 128], variants_reps=2, smollm2=False,
)


def load1() -> float:
    """The 1-minute load average: other engineers' tests share these 2 cores."""
    return round(os.getloadavg()[0], 2)


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def mlx_peak_bytes() -> int | None:
    if "mlx.core" not in sys.modules:
        return None
    import mlx.core as mx

    return int(mx.get_peak_memory())


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def step_stats(seconds: list[float], warmup: int) -> dict:
    """Per-step seconds after warm-up: the fastest (other jobs on the cores only ever add time, so it is
    the estimate least disturbed by them) and the median."""
    steps = seconds[warmup:]
    return dict(step_s=round(min(steps), 3), step_median_s=round(median(steps), 3),
                steps_s=[round(s, 3) for s in seconds])


def rate_stats(batches: list[tuple[int, float]]) -> dict:
    """(tokens, seconds) per batch -> overall tokens/s, and the rate of the fastest half of the tokens
    (batches sorted by rate), which contention disturbs least."""
    tokens, seconds = sum(t for t, _ in batches), sum(s for _, s in batches)
    fast, half_tokens, half_s = sorted(batches, key=lambda b: -b[0] / b[1]), 0, 0.0
    for t, s in fast:
        if half_tokens >= tokens / 2:
            break
        half_tokens, half_s = half_tokens + t, half_s + s
    return dict(tokens=tokens, forward_s=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1),
                best_half_tokens_per_s=round(half_tokens / half_s, 1), batches=len(batches))


def cpu_per_step(marks: list[float], warmup: int) -> float:
    """Median process CPU seconds per step (from process_time marks): less sensitive than wall time to
    other jobs on the same cores."""
    return round(median([b - a for a, b in zip(marks, marks[1:])][warmup:]), 3)


def lengths_shard(pairs: int, prompt_mean: int, response_mean: int, out: str) -> tuple[list[dict], Path]:
    """A synthetic cache shard of `pairs` rows with the bench's length distribution (token ids all alike,
    reference values -1), written to OUT/lengths.parquet: (its rows, its path). Seeded: the same every run."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    rows = []
    for i in range(pairs):
        p = min(max(int(rng.gauss(prompt_mean, prompt_mean / 4)), prompt_mean // 2), 3 * prompt_mean // 2) + 1
        c, r = (rng.randint(response_mean // 2, 3 * response_mean // 2) + 1 for _ in range(2))
        rows.append(dict(index=i, prompt_ids=[5] * p, chosen_ids=[6] * c, rejected_ids=[7] * r,
                         ref_chosen_logps=-1.0, ref_rejected_logps=-1.0))
    shard = Path(out) / "lengths.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), shard, row_group_size=1024)
    return rows, shard


def task_main(tasks: dict) -> None:
    """`python SCRIPT TASK '{json spec}'`: run tasks[TASK](**spec), print its result dict last."""
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    before, pressure, tic = load1(), cpu_pressure(), time.perf_counter()
    result = tasks[name](**spec)
    result.update(load1_before=before, load1_after=load1(), cpu_pressure_before=pressure,
                  cpu_pressure_after=cpu_pressure(), wall_s=round(time.perf_counter() - tic, 2),
                  max_rss_bytes=max_rss_bytes())
    if result.get("mlx_peak_bytes") is None and mlx_peak_bytes() is not None:
        result["mlx_peak_bytes"] = mlx_peak_bytes()
    print(MARK + json.dumps(result), flush=True)
