"""Layouts of the log-prob pass measured against each other in one process, runs interleaved
(A, B, C, A, B, C, ...) so the machine's changing load hits every variant alike.

forward_variants: the precompute forward (no gradient); train_variants: the compiled train step.
`python bench/variants.py TASK '{spec}'`.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import task_main
from logps_tasks import _model_and_batch

import mlx_dpo  # noqa: F401  first: loads OpenBLAS before mlx


def forward_variants(model: str, rows: int, seq: int, reps: int) -> dict:
    """Seconds per precompute forward (N=rows, T=seq): the plain full-logits computation (src before
    #13), src's batch_logps on one stream, and on two streams (what precompute runs)."""
    import numpy as np

    from mlx_dpo.logps import plain_sequence_logps
    from mlx_dpo.pipeline.reference import batch_logps

    m, ids, mask = _model_and_batch(model, seq, rows)
    ids_np, mask_np = np.array(ids), np.array(mask)
    variants = {
        "plain": lambda: np.array(plain_sequence_logps(m, ids, mask)[0]),
        "one_stream": lambda: batch_logps(m, ids_np, mask_np, streams=[None])[0],
        "two_streams": lambda: batch_logps(m, ids_np, mask_np)[0],
    }
    values, times = {}, {name: [] for name in variants}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, run in variants.items():
            tic = time.perf_counter()
            values[name] = run()
            if rep:
                times[name].append(time.perf_counter() - tic)
    out = {"rows": rows, "seq": seq, "reps": reps}
    for name in variants:
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_plain"] = round(min(times[name]) / min(times["plain"]), 3)
        out[f"{name}_max_abs_diff"] = float(np.abs(values[name] - values["plain"]).max())
    return out


def train_variants(model: str, cache: str, fine_tune: str, reps: int) -> dict:
    """Seconds per compiled train step on one batch of 4 pairs: the plain full-logits log-probs (src
    before #13), src (padded to x32 and to x8), and src on packed rows (all 8 sequences in one row,
    block-diagonal mask)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    import mlx_dpo.trainer.train as trainer
    from mlx_dpo.logps import plain_sequence_logps, sequence_logps
    from mlx_dpo.models import load_model
    from mlx_dpo.packing import pack_sequences
    from mlx_dpo.schemas.sequence import truncate_sequence
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy
    from mlx_dpo.trainer.run import open_cache
    from mlx_dpo.trainer.stream import PairStream, iter_rows

    cfg = TrainConfig(cache=cache, model=model, output="unused", fine_tune_type=fine_tune)
    manifest = open_cache(cache)
    shards = [Path(cache) / s.path for s in manifest.splits["train"].shards]
    batches = {x: next(iter(PairStream(shards, batch_size=4, max_length=manifest.max_length, pad_id=3,
                                        truncation_mode=manifest.truncation_mode, shuffle=False,
                                        pad_to_multiple=x, pad_ratio=1.0).epoch(0)))[0] for x in (32, 8)}
    rows = {r["index"]: r for r in iter_rows(shards, None)}
    group = [rows[int(i)] for i in batches[8].indices]
    seqs = [truncate_sequence(r["prompt_ids"], r[k], None) for k in ("chosen_ids", "rejected_ids") for r in group]
    total = sum(len(ids) for ids, _ in seqs)
    packed = pack_sequences(seqs, -(-total // 8) * 8, 3)
    mx.random.seed(0)
    policy = load_model(Path(model))
    prepare_policy(policy, cfg)
    optimizer = optim.AdamW(learning_rate=1e-6)
    optimizer.init(policy.trainable_parameters())
    state = [policy.state, optimizer.state, mx.random.state]
    loss_fn = trainer.make_loss_fn(cfg.loss_options())
    n = 2 * len(group)

    def plain_loss(model_, ids, mask, plan, *rest):
        saved = trainer.sequence_logps
        trainer.sequence_logps = lambda m, i, k, plan=None: plain_sequence_logps(m, i, k)
        try:
            return loss_fn(model_, ids, mask, plan, *rest)
        finally:
            trainer.sequence_logps = saved

    def packed_loss(model_, ids, mask, plan, segments, *rest):
        saved = trainer.sequence_logps
        trainer.sequence_logps = lambda m, i, k, plan=None: sequence_logps(m, i, k, plan=plan, segments=segments, sequences=n)
        try:
            return loss_fn(model_, ids, mask, plan, *rest)
        finally:
            trainer.sequence_logps = saved

    def make_step(fn):
        value_and_grad = nn.value_and_grad(policy, fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*arrays):
            (loss, _), grad = value_and_grad(policy, *arrays)
            optimizer.update(policy, grad)
            return loss

        return step

    def rest(b):  # reference values, pair weights, 1 / (pairs, chosen tokens)
        return [mx.array(a) for a in (b.ref_chosen_logps, b.ref_rejected_logps, b.weights, (1 / b.counts()).astype("float32"))]

    def arrays(b):
        return [mx.array(a) for a in (b.input_ids, b.completion_mask, b.plan)] + rest(b)

    p8 = batches[8]
    variants = {  # name: (step, arrays, padded tokens)
        "plain": (make_step(plain_loss), arrays(batches[32]), batches[32].input_ids.size),
        "src": (make_step(loss_fn), arrays(batches[32]), batches[32].input_ids.size),
        "src_x8": (make_step(loss_fn), arrays(p8), p8.input_ids.size),
        "packed": (make_step(packed_loss), [mx.array(packed[k]) for k in ("input_ids", "completion_mask", "plan", "segments")]
                   + rest(p8), packed["input_ids"].size),
    }
    times, peaks = {name: [] for name in variants}, {name: 0 for name in variants}
    for rep in range(reps + 1):
        for name, (step, args, _) in variants.items():
            mx.reset_peak_memory()
            tic = time.perf_counter()
            mx.eval(step(*args), state)
            if rep:
                times[name].append(time.perf_counter() - tic)
                peaks[name] = max(peaks[name], mx.get_peak_memory())
    out = {"fine_tune": fine_tune, "reps": reps, "real_tokens": total}
    for name, (_, _, padded) in variants.items():
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_src"] = round(min(times[name]) / min(times["src"]), 3)
        out[f"{name}_peak_bytes"] = peaks[name]  # of the step, weights and optimizer state included
        out[f"{name}_padded_tokens"] = int(padded)
    return out


if __name__ == "__main__":
    task_main({f.__name__: f for f in (forward_variants, train_variants)})
