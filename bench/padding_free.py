"""Padding-free train steps (mlx_dpo.padding_free: the body run on each row alone, at its own width)
against today's padded step, in one process, runs interleaved (A, B, C, A, B, C, ...).

step_variants: seconds per train step on the bench's first batch of 4 pairs, LoRA and full fine-tuning
(two policies in one process), compiled and not; shape_counts: host only, over an epoch of the bench's
length distribution, the padding of each row-width ladder and the distinct signatures the compiled step
would be traced for. `python bench/padding_free.py TASK '{spec}'`.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from common import lengths_shard, load1, task_main

import mlx_dpo  # noqa: F401  first: loads OpenBLAS before mlx


def _policy(model: str, cache: str, fine_tune: str):
    """A policy prepared as `mlx-dpo train` prepares it, its optimizer, state and loss."""
    import mlx.core as mx
    import mlx.optimizers as optim

    import mlx_dpo.trainer.train as trainer
    from mlx_dpo.models import load_model
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy

    cfg = TrainConfig(cache=cache, model=model, output="unused", fine_tune_type=fine_tune)
    mx.random.seed(0)
    policy = load_model(Path(model))
    prepare_policy(policy, cfg)
    optimizer = optim.AdamW(learning_rate=1e-6)
    optimizer.init(policy.trainable_parameters())
    return policy, optimizer, [policy.state, optimizer.state, mx.random.state], trainer.make_loss_fn(cfg.loss_options())


def _step(policy, optimizer, state, loss_fn, compiled: bool):
    """The train step (one micro-batch, no clipping): step(arrays, widths) -> loss; compiled as train
    compiles it (traced once per input shapes and widths) or run eagerly."""
    import mlx.core as mx
    import mlx.nn as nn

    value_and_grad = nn.value_and_grad(policy, loss_fn)

    def step(arrays, widths):
        (loss, _), grad = value_and_grad(policy, *arrays, widths=widths)
        optimizer.update(policy, grad)
        return loss

    return partial(mx.compile, inputs=state, outputs=state)(step) if compiled else step


VARIANTS = ("padded", "padded_eager", "rows_x8", "rows_x8_eager", "rows_eager")


def step_variants(model: str, cache: str, reps: int, fine_tunes: tuple = ("lora", "full"), names: tuple = VARIANTS) -> dict:
    """Seconds per train step on the cache's first batch of 4 pairs (the bench's step batch) as train
    streams it (default shape ladders), per fine-tuning type: `padded` (train's compiled step),
    `padded_eager` (not compiled), `rows_x8` (padding-free, row widths to x8, compiled), `rows_x8_eager`,
    and `rows_eager` (widths and scored positions unrounded, not compiled). The first round warms up and
    traces (its time minus the fastest is a trace's cost); then the fastest of `reps`."""
    import mlx.core as mx
    import numpy as np

    from mlx_dpo.logps import score_plan, sequence_logps
    from mlx_dpo.padding_free import row_widths
    from mlx_dpo.trainer.run import open_cache
    from mlx_dpo.trainer.stream import PairStream

    manifest = open_cache(cache)
    shards = [Path(cache) / s.path for s in manifest.splits["train"].shards]
    batch = next(iter(PairStream(shards, batch_size=4, max_length=manifest.max_length, pad_id=3,
                                 truncation_mode=manifest.truncation_mode, shuffle=False).epoch(0)))[0]
    rest = [mx.array(a) for a in (batch.ref_chosen_logps, batch.ref_rejected_logps, batch.weights,
                                  (1 / batch.counts()).astype("float32"))]
    ids, mask = mx.array(batch.input_ids), mx.array(batch.completion_mask)
    ladder_plan, exact_plan = mx.array(batch.plan), mx.array(score_plan(batch.completion_mask, 1))
    x8, exact = row_widths(batch.completion_mask, 8), row_widths(batch.completion_mask, 1)
    out = {"reps": reps, "rows": int(ids.shape[0]), "padded_positions": int(ids.shape[0] * (ids.shape[1] - 1)),
           "rows_x8_positions": sum(x8), "needed_positions": sum(exact), "widths_x8": list(x8),
           "scored_positions": int(batch.plan[2].sum()), "plan_positions": int(batch.plan.shape[1])}
    variants = {}
    for ft in fine_tunes:
        policy, optimizer, state, loss_fn = _policy(model, cache, ft)
        if "max_abs_diff_logps" not in out:  # the log-probs of both layouts at the starting weights (LoRA: the base model)
            policy.eval()
            padded = np.array(sequence_logps(policy, ids, mask, plan=ladder_plan)[0])
            rows = np.array(sequence_logps(policy, ids, mask, plan=exact_plan, widths=exact)[0])
            out["max_abs_diff_logps"] = float(np.abs(rows - padded).max())
            policy.train()
        for name, compiled, plan, widths in (("padded", True, ladder_plan, None), ("padded_eager", False, ladder_plan, None),
                                             ("rows_x8", True, ladder_plan, x8), ("rows_x8_eager", False, ladder_plan, x8),
                                             ("rows_eager", False, exact_plan, exact)):
            if name in names:
                variants[f"{ft}_{name}"] = (_step(policy, optimizer, state, loss_fn, compiled),
                                            ([ids, mask, plan, *rest], widths), state)
    times, peaks = {name: [] for name in variants}, dict.fromkeys(variants, 0)
    cpu = {name: [] for name in variants}  # process CPU seconds: other jobs on the cores disturb them less
    for rep in range(reps + 1):  # rep 0 warms up (and traces the compiled steps)
        for name, (step, args, state) in variants.items():
            mx.reset_peak_memory()
            tic, cpu_tic = time.perf_counter(), time.process_time()
            mx.eval(step(*args), state)
            times[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - cpu_tic)
            print(f"round {rep} {name}: {times[name][-1]:.2f} s, CPU {cpu[name][-1]:.2f} s (load {load1()})",
                  file=sys.stderr, flush=True)
            if rep:
                peaks[name] = max(peaks[name], mx.get_peak_memory())
    for name in variants:
        ft, fastest = name.split("_")[0], min(times[name][1:])
        out[f"{name}_s"] = round(fastest, 3)
        if f"{ft}_padded" in times:
            out[f"{name}_vs_padded"] = round(fastest / min(times[f"{ft}_padded"][1:]), 3)
        out[f"{name}_first_call_s"] = round(times[name][0], 3)
        out[f"{name}_cpu_s"] = round(min(cpu[name][1:]), 3)
        out[f"{name}_first_call_cpu_s"] = round(cpu[name][0], 3)
        if f"{ft}_padded" in cpu:
            out[f"{name}_cpu_vs_padded"] = round(min(cpu[name][1:]) / min(cpu[f"{ft}_padded"][1:]), 3)
        out[f"{name}_peak_bytes"] = peaks[name]
        out[f"{name}_steps_s"] = [round(t, 3) for t in times[name]]
    return out


# Row-width ladders measured by shape_counts: (multiple, ratio).
ROW_LADDERS = [(1, 1.0), (8, 1.0), (16, 1.0), (16, 1.0625), (16, 1.125), (32, 1.0), (32, 1.25)]


def shape_counts(pairs: int, prompt_mean: int, response_mean: int, out: str, epochs: int = 1) -> dict:
    """Over `epochs` of a synthetic cache of `pairs` pairs with the bench's lengths (common.lengths_shard),
    batch 4 as train streams it: the body's padding (positions run but not needed, of
    those run) and the distinct compiled-step signatures (scored positions and the tuple of row widths;
    also the widths as a multiset: rows sorted by width) of the padded step and of each ROW_LADDERS."""
    import numpy as np

    from mlx_dpo.padding_free import row_widths
    from mlx_dpo.trainer.stream import PairStream

    _, shard = lengths_shard(pairs, prompt_mean, response_mean, out)  # bench/tasks.py padding's rows
    stream = PairStream([shard], batch_size=4, max_length=None, truncation_mode="keep_start", pad_id=0, shuffle=True,
                        seed=0, fixed_rows=True)
    batches = [b for epoch in range(epochs) for [b] in stream.epoch(epoch)]
    needed = sum(sum(row_widths(b.completion_mask, 1)) for b in batches)
    padded = sum(b.input_ids.shape[0] * (b.input_ids.shape[1] - 1) for b in batches)
    result = {"pairs": pairs, "epochs": epochs, "steps": len(batches), "padded_waste": round(1 - needed / padded, 4),
              "padded_shapes": len({(b.input_ids.shape, b.plan.shape[1]) for b in batches})}
    for multiple, ratio in ROW_LADDERS:
        widths = [row_widths(b.completion_mask, multiple, ratio) for b in batches]
        key = f"rows_x{multiple}" + (f"_r{ratio}" if ratio > 1 else "")
        result[f"{key}_waste"] = round(1 - needed / sum(sum(w) for w in widths), 4)
        result[f"{key}_shapes"] = len({(w, b.plan.shape[1]) for w, b in zip(widths, batches)})
        result[f"{key}_shapes_sorted"] = len({(tuple(sorted(w)), b.plan.shape[1]) for w, b in zip(widths, batches)})
        result[f"{key}_widths"] = len({x for w in widths for x in w})
    result["rows_per_step"] = int(np.mean([b.input_ids.shape[0] for b in batches]))
    return result


if __name__ == "__main__":
    task_main({f.__name__: f for f in (step_variants, shape_counts)})
