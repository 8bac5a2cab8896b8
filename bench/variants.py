"""Candidate changes to src, measured against src in one process with the runs interleaved
(A, B, C, A, B, C, ...) so the machine's changing load hits every variant alike.

forward_variants: the precompute forward (no gradient); train_variants: the compiled train step.
`python bench/variants.py TASK '{spec}'`.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from common import task_main
from logps_tasks import _model_and_batch, chunked_sequence_logps

import mlx_dpo  # first: loads OpenBLAS before mlx


def set_blas_threads(n: int) -> None:
    """OpenBLAS threads at run time (the library `import mlx_dpo` loaded)."""
    if mlx_dpo.BLAS_STATUS.startswith("loaded"):
        ctypes.CDLL(mlx_dpo.BLAS_STATUS.split(" from ", 1)[1]).openblas_set_num_threads(n)


def _head(model):
    return model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear


def completion_only_logps(model, input_ids, completion_mask, normaliser: str = "mlx"):
    """Proposal: the lm_head and the vocabulary log-sum-exp only at the scored positions (completion
    tokens), not at prompt and padding positions. Indices come from the mask on the host."""
    import mlx.core as mx
    import numpy as np

    mask = np.asarray(completion_mask[:, 1:])  # (N, T-1)
    rows, cols = np.nonzero(mask)
    flat = mx.array(rows * mask.shape[1] + cols)
    hidden = model.model(input_ids[:, :-1])  # (N, T-1, D)
    logits = _head(model)(hidden.reshape(-1, hidden.shape[-1])[flat]).astype(mx.float32)  # (M, V)
    picked = mx.take_along_axis(logits, input_ids[:, 1:].reshape(-1)[flat][:, None], axis=-1)[:, 0]
    if normaliser == "numpy":
        per_token = picked - mx.array(numpy_logsumexp(logits))
    else:
        per_token = picked - mx.logsumexp(logits, axis=-1)
    logps = mx.zeros((mask.shape[0],), mx.float32).at[mx.array(rows)].add(per_token)
    return logps, mx.array(mask.sum(-1).astype(np.float32))


def numpy_logsumexp(logits, rows_per_chunk: int = 64):
    """log-sum-exp over the last axis in numpy (vectorised exp, ~5x MLX's on this CPU), in chunks
    through one reused buffer: fresh 100 MB temporaries cost more in page faults than the exp."""
    import mlx.core as mx
    import numpy as np

    mx.eval(logits)
    x = np.asarray(logits).reshape(-1, logits.shape[-1])
    out = np.empty(x.shape[0], np.float32)
    buf = np.empty((rows_per_chunk, x.shape[1]), np.float32)
    for s in range(0, x.shape[0], rows_per_chunk):
        part, b = x[s : s + rows_per_chunk], buf[: min(rows_per_chunk, x.shape[0] - s)]
        top = part.max(axis=-1, keepdims=True)
        np.exp(np.subtract(part, top, out=b), out=b)
        out[s : s + len(b)] = np.log(b.sum(axis=-1)) + top[:, 0]
    return out.reshape(logits.shape[:-1])


def numpy_normaliser_logps(model, input_ids, completion_mask):
    """Proposal for the precompute: src's sequence_logps with the normaliser computed in numpy."""
    import mlx.core as mx

    logits = model(input_ids[:, :-1])  # (N, T-1, V)
    picked = mx.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = completion_mask[:, 1:].astype(mx.float32)
    return ((picked - mx.array(numpy_logsumexp(logits))) * mask).sum(-1), mask.sum(-1)


def two_streams(fn, model, input_ids, completion_mask):
    """Proposal: half the batch on each of two CPU streams (one per core), BLAS single-threaded: MLX runs
    its non-matmul ops on one thread per stream, so one stream leaves a core idle outside matmuls."""
    import mlx.core as mx

    half, outs = input_ids.shape[0] // 2, []
    for stream, part in zip(STREAMS, (slice(0, half), slice(half, None))):
        with mx.stream(stream):
            outs.append(fn(model, input_ids[part], completion_mask[part]))
    return mx.concatenate([o[0] for o in outs]), mx.concatenate([o[1] for o in outs])


STREAMS = []


def forward_variants(model: str, rows: int, seq: int, reps: int, blas_threads: int = 2) -> dict:
    """Seconds per precompute forward (N=rows, T=seq) for src's sequence_logps and the candidates."""
    import mlx.core as mx
    import numpy as np

    from mlx_dpo.logps import sequence_logps

    STREAMS[:] = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    m, ids, mask = _model_and_batch(model, seq, rows)
    compiled = mx.compile(lambda i, k: sequence_logps(m, i, k))
    variants = {  # name: (run, BLAS threads)
        "src": (lambda: sequence_logps(m, ids, mask), blas_threads),
        "compiled": (lambda: compiled(ids, mask), blas_threads),
        "chunked": (lambda: chunked_sequence_logps(m, ids, mask), blas_threads),
        "numpy_normaliser": (lambda: numpy_normaliser_logps(m, ids, mask), blas_threads),
        "completion_only": (lambda: completion_only_logps(m, ids, mask), blas_threads),
        "two_streams": (lambda: two_streams(sequence_logps, m, ids, mask), 1),
        "two_streams_completion_only": (lambda: two_streams(completion_only_logps, m, ids, mask), 1),
    }
    values, times = {}, {name: [] for name in variants}
    for rep in range(reps + 1):  # rep 0 warms up (and compiles)
        for name, (run, threads) in variants.items():
            set_blas_threads(threads)
            tic = time.perf_counter()
            out = run()
            mx.eval(out)
            if rep:
                times[name].append(time.perf_counter() - tic)
            values[name] = np.asarray(out[0])
    set_blas_threads(blas_threads)
    out = {"rows": rows, "seq": seq, "reps": reps}
    for name in variants:
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_src"] = round(min(times[name]) / min(times["src"]), 3)
        out[f"{name}_max_abs_diff"] = float(np.abs(values[name] - values["src"]).max())
    return out


def train_variants(model: str, cache: str, fine_tune: str, reps: int) -> dict:
    """Seconds per compiled train step on one batch of 4 pairs: src, padding to x8 instead of x32, and the
    completion-only log-probs (indices fixed for the batch, as a collate step would provide them)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    import mlx_dpo.trainer.train as trainer
    from mlx_dpo.models import load_model
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy
    from mlx_dpo.trainer.run import open_cache
    from mlx_dpo.trainer.stream import PairStream

    cfg = TrainConfig(cache=cache, model=model, output="unused", fine_tune_type=fine_tune)
    manifest = open_cache(cache)
    shards = [Path(cache) / s.path for s in manifest.splits["train"].shards]
    batches = {x: next(iter(PairStream(shards, batch_size=4, max_length=manifest.max_length, pad_id=3,
                                        truncation_mode=manifest.truncation_mode, shuffle=False,
                                        pad_to_multiple=x).epoch(0)))[0] for x in (32, 8)}
    mx.random.seed(0)
    policy = load_model(Path(model))
    prepare_policy(policy, cfg)
    optimizer = optim.AdamW(learning_rate=1e-6)
    optimizer.init(policy.trainable_parameters())  # a lazily created state would retrace every step once
    state = [policy.state, optimizer.state, mx.random.state]
    src_logps = trainer.sequence_logps

    def make_step():
        value_and_grad = nn.value_and_grad(policy, trainer.make_loss_fn(cfg.loss_options()))

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*arrays):
            (loss, _), grad = value_and_grad(policy, *arrays)
            optimizer.update(policy, grad)
            return loss

        return step

    variants = {}  # name: (step, batch, sequence_logps used while tracing)
    for name, x, logps in (("src", 32, src_logps), ("pad_x8", 8, src_logps),
                           ("completion_only", 32, completion_only_logps), ("pad_x8_completion_only", 8, completion_only_logps)):
        variants[name] = (make_step(), batches[x], logps)
    times, peaks = {name: [] for name in variants}, {name: 0 for name in variants}
    for rep in range(reps + 1):
        for name, (step, b, logps) in variants.items():
            trainer.sequence_logps = logps if logps is src_logps else _fixed_mask(b)
            arrays = [mx.array(a) for a in (b.input_ids, b.completion_mask, b.ref_chosen_logps, b.ref_rejected_logps,
                                            b.weights, (1 / b.counts()).astype("float32"))]  # 1 / (pairs, tokens)
            mx.reset_peak_memory()
            tic = time.perf_counter()
            mx.eval(step(*arrays), state)
            if rep:
                times[name].append(time.perf_counter() - tic)
                peaks[name] = max(peaks[name], mx.get_peak_memory())
    out = {"fine_tune": fine_tune, "reps": reps, "widths": {x: int(b.input_ids.shape[1]) for x, b in batches.items()}}
    for name in variants:
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_src"] = round(min(times[name]) / min(times["src"]), 3)
        out[f"{name}_peak_bytes"] = peaks[name]  # of the step, weights and optimizer state included
    return out


def _fixed_mask(batch):
    """completion_only_logps for a traced step: the host-side mask is the batch's own (it is fixed)."""
    def logps(model, input_ids, completion_mask):
        return completion_only_logps(model, input_ids, batch.completion_mask)

    return logps


if __name__ == "__main__":
    task_main({f.__name__: f for f in (forward_variants, train_variants)})
