"""Figure 5, one task per process: `python bench/logps_tasks.py TASK '{spec}'`.

logps_memory: peak memory of one log-prob pass (ours: chunked at the scored positions; a plain log_softmax);
token_logps_memory: the temporaries of the log-softmax alone; lse_speed: the vocabulary normaliser in MLX
and numpy (why variants.py tries numpy for it).
"""

from __future__ import annotations

import time
from pathlib import Path

from common import median, task_main

import mlx_dpo  # noqa: F401  first: loads OpenBLAS before mlx


def _model_and_batch(model: str, seq: int, rows: int):
    import mlx.core as mx

    from mlx_dpo.models import load_model

    m = load_model(Path(model))
    vocab = m.args.vocab_size
    ids = mx.random.randint(4, vocab, (rows, seq), key=mx.random.key(0)).astype(mx.int32)
    mask = (mx.arange(seq)[None] >= seq // 3).astype(mx.int32) * mx.ones((rows, 1), mx.int32)  # prompt: first third
    return m, ids, mask


def logps_memory(model: str, variant: str, seq: int, rows: int = 1) -> dict:
    """Peak memory above the loaded weights and inputs of one log-prob pass (N=rows, T=seq)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_dpo.logps import sequence_logps

    m, ids, mask = _model_and_batch(model, seq, rows)
    mx.eval(m.parameters(), ids, mask)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if variant == "body":  # the transformer without the head: what any variant pays
        out = m.model(ids[:, :-1]).sum()
    elif variant == "ours":
        out = sequence_logps(m, ids, mask)[0]
    elif variant == "plain":
        logp = nn.log_softmax(m(ids[:, :-1]).astype(mx.float32), axis=-1)  # (N, T-1, V)
        out = (mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:]).sum(-1)
    mx.eval(out)
    seconds = time.perf_counter() - tic
    from mlx_dpo.logps import LOGITS_CHUNK_BYTES
    logits_bytes = rows * (seq - 1) * m.args.vocab_size * 4
    return dict(vocab=m.args.vocab_size, seq=seq, rows=rows, extra_peak_bytes=mx.get_peak_memory() - base,
                logits_bytes=logits_bytes, seconds=round(seconds, 3), chunk_budget_bytes=LOGITS_CHUNK_BYTES)


def token_logps_memory(vocab: int, seq: int, variant: str, rows: int = 1) -> dict:
    """Temporaries of the log-softmax alone, given (N, T, V) float32 logits: ours vs plain log_softmax."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_dpo.logps import token_logps

    logits = mx.random.normal((rows, seq, vocab))
    targets = mx.random.randint(0, vocab, (rows, seq)).astype(mx.int32)
    mx.eval(logits, targets)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    if variant == "ours":
        out = token_logps(logits, targets)
    else:
        out = mx.take_along_axis(nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    mx.eval(out)
    return dict(vocab=vocab, seq=seq, rows=rows, extra_peak_bytes=mx.get_peak_memory() - base,
                logits_bytes=logits.nbytes)


def lse_speed(rows: int, vocab: int) -> dict:
    """The softmax normaliser over the vocabulary: MLX's logsumexp, a compiled one, and numpy's."""
    import mlx.core as mx
    import numpy as np

    x = mx.random.normal((rows, vocab))
    mx.eval(x)
    xn = np.array(x)

    def manual(x):
        top = x.max(axis=-1, keepdims=True)
        return mx.log(mx.exp(x - top).sum(axis=-1)) + top[..., 0]

    def numpy_lse(x):
        top = x.max(axis=-1, keepdims=True)
        return np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]

    compiled = mx.compile(manual)
    runs = {
        "mx_logsumexp": lambda: mx.eval(mx.logsumexp(x, axis=-1)),
        "mx_compiled": lambda: mx.eval(compiled(x)),
        "mx_exp": lambda: mx.eval(mx.exp(x)),
        "numpy_lse": lambda: numpy_lse(xn),
        "numpy_exp": lambda: np.exp(xn),
    }
    out = {"rows": rows, "vocab": vocab}
    for name, run in runs.items():
        run()
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            run()
            times.append(time.perf_counter() - tic)
        out[f"{name}_s"] = round(median(times), 4)
        out[f"{name}_melem_per_s"] = round(rows * vocab / median(times) / 1e6, 1)
    return out


if __name__ == "__main__":
    task_main({f.__name__: f for f in (logps_memory, token_logps_memory, lse_speed)})
