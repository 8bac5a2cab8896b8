"""Layouts of the log-prob pass measured against each other in one process, runs interleaved
(A, B, C, A, B, C, ...) so the machine's changing load hits every variant alike.

forward_variants: the precompute forward (no gradient); rounds_variants: precompute's forwards on a small
file, a batch per forward or in rounds; train_variants: the compiled train step.
`python bench/variants.py TASK '{spec}'`.
"""

from __future__ import annotations

import json
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


def _step_setup(model: str, cache: str, fine_tune: str) -> dict:
    """A policy prepared as `mlx-dpo train` prepares it, its loss, and the first batch of 4 pairs of the
    cache padded to x32 and to x8 (the same pairs), plus `make_step(loss)` -> a compiled train step."""

    import mlx.core as mx
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
                                        pad_to_multiple=x, pad_ratio=1.0).epoch(0)))[0] for x in (32, 8)}
    mx.random.seed(0)
    policy = load_model(Path(model))
    prepare_policy(policy, cfg)
    optimizer = optim.AdamW(learning_rate=1e-6)
    optimizer.init(policy.trainable_parameters())
    state = [policy.state, optimizer.state, mx.random.state]

    def make_step(fn):
        return _compiled_step(policy, optimizer, state, fn)

    def rest(b):  # reference values, pair weights, 1 / (pairs, chosen tokens)
        return [mx.array(a) for a in (b.ref_chosen_logps, b.ref_rejected_logps, b.weights, (1 / b.counts()).astype("float32"))]

    def arrays(b):
        return [mx.array(a) for a in (b.input_ids, b.completion_mask, b.plan)] + rest(b)

    return dict(shards=shards, batches=batches, state=state, make_step=make_step, rest=rest, arrays=arrays,
                loss_fn=trainer.make_loss_fn(cfg.loss_options()))


def _interleaved(variants: dict, state, reps: int) -> tuple[dict, dict]:
    """Run each variant's (step, arrays, ...) in turn, reps + 1 rounds (the first warms up and
    traces); -> ({name: [seconds]}, {name: peak bytes})."""
    import mlx.core as mx

    times, peaks = {name: [] for name in variants}, {name: 0 for name in variants}
    for rep in range(reps + 1):
        for name, (step, args, *_) in variants.items():
            mx.reset_peak_memory()
            tic = time.perf_counter()
            mx.eval(step(*args), state)
            if rep:
                times[name].append(time.perf_counter() - tic)
                peaks[name] = max(peaks[name], mx.get_peak_memory())
    return times, peaks


def train_variants(model: str, cache: str, fine_tune: str, reps: int) -> dict:
    """Seconds per compiled train step on one batch of 4 pairs: the plain full-logits log-probs (src
    before #13), src (padded to x32 and to x8), and src on packed rows (all 8 sequences in one row,
    block-diagonal mask)."""
    import mlx.core as mx

    import mlx_dpo.trainer.train as trainer
    from mlx_dpo.logps import plain_sequence_logps, sequence_logps
    from mlx_dpo.packing import pack_sequences
    from mlx_dpo.schemas.sequence import truncate_sequence
    from mlx_dpo.trainer.stream import iter_rows

    run = _step_setup(model, cache, fine_tune)
    batches, loss_fn, make_step, rest, arrays = (run[k] for k in ("batches", "loss_fn", "make_step", "rest", "arrays"))
    rows = {r["index"]: r for r in iter_rows(run["shards"], None)}
    group = [rows[int(i)] for i in batches[8].indices]
    seqs = [truncate_sequence(r["prompt_ids"], r[k], None) for k in ("chosen_ids", "rejected_ids") for r in group]
    total = sum(len(ids) for ids, _ in seqs)
    packed = pack_sequences(seqs, -(-total // 8) * 8, 3)
    n = 2 * len(group)

    def plain_loss(model_, ids, mask, plan, *rest):
        saved = trainer.sequence_logps
        trainer.sequence_logps = lambda m, i, k, plan=None, prompt=None, widths=None: plain_sequence_logps(m, i, k)
        try:
            return loss_fn(model_, ids, mask, plan, *rest)
        finally:
            trainer.sequence_logps = saved

    def packed_loss(model_, ids, mask, plan, segments, *rest):
        saved = trainer.sequence_logps
        trainer.sequence_logps = lambda m, i, k, plan=None, prompt=None, widths=None: sequence_logps(m, i, k, plan=plan, segments=segments, sequences=n)
        try:
            return loss_fn(model_, ids, mask, plan, *rest)
        finally:
            trainer.sequence_logps = saved

    p8 = batches[8]
    variants = {  # name: (step, arrays, padded tokens)
        "plain": (make_step(plain_loss), arrays(batches[32]), batches[32].input_ids.size),
        "src": (make_step(loss_fn), arrays(batches[32]), batches[32].input_ids.size),
        "src_x8": (make_step(loss_fn), arrays(p8), p8.input_ids.size),
        "packed": (make_step(packed_loss), [mx.array(packed[k]) for k in ("input_ids", "completion_mask", "plan", "segments")]
                   + rest(p8), packed["input_ids"].size),
    }
    times, peaks = _interleaved(variants, run["state"], reps)
    out = {"fine_tune": fine_tune, "reps": reps, "real_tokens": total}
    for name, (_, _, padded) in variants.items():
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_src"] = round(min(times[name]) / min(times["src"]), 3)
        out[f"{name}_peak_bytes"] = peaks[name]  # of the step, weights and optimizer state included
        out[f"{name}_padded_tokens"] = int(padded)
    return out


def _autodiff_token_terms(head, hidden, targets, chunk):
    """logps._token_terms as it was before the saved log-sum-exp (the A/B's baseline): the backward
    recomputes a chunk's logits and takes mx.vjp of the whole forward (log-sum-exp forward and
    backward, the target's scatter). Frozen heads only (the LoRA step)."""
    import mlx.core as mx

    from mlx_dpo.logps import _logsumexp

    starts = range(0, hidden.shape[0], chunk)

    def terms(h, t):
        logits = head(h).astype(mx.float32)
        return mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - _logsumexp(logits)

    def joined(parts):
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    @mx.custom_function
    def scored(hidden, targets):
        parts = []
        for s in starts:
            h = hidden[s : s + chunk] if not parts else mx.depends(hidden[s : s + chunk], parts[-1])
            parts.append(terms(h, targets[s : s + chunk]))
        return joined(parts)

    @scored.vjp
    def scored_vjp(primals, cotangent, _):
        hidden, targets = primals
        grads = []
        for s in starts:
            h = hidden[s : s + chunk] if not grads else mx.depends(hidden[s : s + chunk], grads[-1])
            t = targets[s : s + chunk]
            grads.append(mx.vjp(lambda h, t=t: terms(h, t), [h], [cotangent[s : s + chunk]])[1][0])
        return joined(grads), mx.zeros_like(targets)

    return scored(hidden, targets)


def head_variants(model: str, cache: str, reps: int, live: int | None = None) -> dict:
    """Seconds per compiled LoRA train step (4 pairs, padded to x8): the LM head's backward by autodiff
    of the chunk's forward (src before the saved log-sum-exp) against src's (saved log-sum-exp, one
    softmax pass), and src with `live` in place of LIVE_CHUNK_ARRAYS (bigger chunks), if given."""
    import mlx_dpo.logps as logps

    run = _step_setup(model, cache, "lora")
    src_terms, src_live = logps._token_terms, logps.LIVE_CHUNK_ARRAYS
    batch = run["batches"][8]

    def with_head(terms, live_arrays):
        def loss(*args):  # the patch is in place while the compiled step traces (its first call)
            logps._token_terms, logps.LIVE_CHUNK_ARRAYS = terms, live_arrays
            try:
                return run["loss_fn"](*args)
            finally:
                logps._token_terms, logps.LIVE_CHUNK_ARRAYS = src_terms, src_live
        return run["make_step"](loss), run["arrays"](batch)

    variants = {"autodiff": with_head(_autodiff_token_terms, src_live), "src": with_head(src_terms, src_live)}
    if live:
        variants["src_live"] = with_head(src_terms, live)
    times, peaks = _interleaved(variants, run["state"], reps)
    out = {"reps": reps, "vocab": json.loads((Path(model) / "config.json").read_text())["vocab_size"],
           "scored_positions": int(batch.plan[2].sum()), "plan_positions": int(batch.plan.shape[1]),
           "live": live, "src_live": src_live}
    for name in variants:
        out[f"{name}_s"] = round(min(times[name]), 3)
        out[f"{name}_vs_autodiff"] = round(min(times[name]) / min(times["autodiff"]), 3)
        out[f"{name}_peak_bytes"] = peaks[name]
    return out


def _id_pairs(pairs: int, prompt_mean: int, response_mean: int, vocab: int, seed: int) -> list[dict]:
    """build.make_pairs's rows as the bench tokenizer encodes them (word w<i> is id i, <s> = 1 opens the
    prompt): with the bench's means and seed 2, its step data."""
    from build import make_pairs

    ids = lambda text: [int(w[1:]) for w in text.split()]  # noqa: E731
    return [dict(prompt_ids=[1, *ids(r["prompt"])], chosen_ids=ids(r["chosen"]), rejected_ids=ids(r["rejected"]))
            for r in make_pairs(pairs, seed, prompt_mean, response_mean, vocab)]


def prompt_once_variants(model: str, fine_tune: str, prompt_mean: int, response_mean: int, reps: int,
                         pairs: int = 4, seed: int = 2) -> dict:
    """Seconds per compiled train step (`fine_tune`) and per no-grad forward (what precompute runs per
    batch, one stream) on `pairs` pairs: src's layout (prompt+answer rows) against the prompt once per
    pair, both at the trainer's width and score ladders; and the largest difference of their log-probs."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    import mlx_dpo.trainer.train as trainer
    from mlx_dpo.logps import collate_pairs, score_plan, sequence_logps
    from mlx_dpo.models import load_model
    from mlx_dpo.prompt_once import collate_prompt_once
    from mlx_dpo.shapes import SCORE_MULTIPLE, SCORE_RATIO, WIDTH_MULTIPLE, WIDTH_RATIO
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy

    mx.random.seed(0)
    policy = load_model(Path(model))
    rows = _id_pairs(pairs, prompt_mean, response_mean, policy.args.vocab_size, seed)
    ladder = dict(max_length=None, truncation_mode="keep_start", pad_id=3, pad_to_multiple=WIDTH_MULTIPLE, pad_ratio=WIDTH_RATIO)
    ids, mask = collate_pairs(rows, **ladder)
    once = collate_prompt_once(rows, **ladder)
    cfg = TrainConfig(cache="unused", model=model, output="unused", fine_tune_type=fine_tune)
    prepare_policy(policy, cfg)
    optimizer = optim.AdamW(learning_rate=1e-6)
    optimizer.init(policy.trainable_parameters())
    state = [policy.state, optimizer.state, mx.random.state]
    loss_fn = trainer.make_loss_fn(cfg.loss_options())
    chosen_tokens = float(mask[:pairs, 1:].sum())
    rest = [mx.zeros((pairs,)), mx.zeros((pairs,)), mx.ones((pairs,)), mx.array([1 / pairs, 1 / chosen_tokens])]

    def once_loss(model_, ids_, mask_, plan, prompt_ids, prompt_mask, *rest_):  # as train's step with --prompt-once on
        return loss_fn(model_, ids_, mask_, plan, *rest_, prompt=(prompt_ids, prompt_mask))

    plan = lambda m: score_plan(m, SCORE_MULTIPLE, SCORE_RATIO)  # noqa: E731  as the trainer's batches
    src_arrays = [mx.array(a) for a in (ids, mask, plan(mask))]
    once_arrays = [mx.array(a) for a in (once["input_ids"], once["completion_mask"], plan(once["completion_mask"]))]
    prompt = [mx.array(once[k]) for k in ("prompt_ids", "prompt_mask")]
    variants = {  # name: (train step, its arguments, forward)
        "src": (_compiled_step(policy, optimizer, state, loss_fn), src_arrays + rest,
                lambda: sequence_logps(policy, *src_arrays[:2], plan=src_arrays[2])[0]),
        "once": (_compiled_step(policy, optimizer, state, once_loss), once_arrays + prompt + rest,
                 lambda: sequence_logps(policy, *once_arrays[:2], plan=once_arrays[2], prompt=prompt)[0]),
    }
    policy.eval()  # the forward as precompute runs it (no dropout); values compared at the starting weights
    values = {name: np.array(forward()) for name, (_, _, forward) in variants.items()}
    policy.train()
    times = {f"{name}_{what}": [] for name in variants for what in ("step", "forward")}
    for rep in range(reps + 1):  # rep 0 warms up (and compiles)
        for name, (step, args, forward) in variants.items():
            for what in ("step", "forward"):
                tic = time.perf_counter()
                mx.eval(step(*args), state) if what == "step" else mx.eval(forward())
                if rep:
                    times[f"{name}_{what}"].append(time.perf_counter() - tic)
    out = {"fine_tune": fine_tune, "pairs": pairs, "prompt_mean": prompt_mean, "response_mean": response_mean, "reps": reps,
           "real_tokens": int(sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)),
           "src_tokens": int(ids.size), "once_tokens": int(once["prompt_ids"].size + once["input_ids"].size),
           "max_abs_diff": float(np.abs(values["once"] - values["src"]).max())}
    for key, seconds in times.items():
        out[f"{key}_s"] = round(min(seconds), 3)
    for what in ("step", "forward"):
        out[f"once_vs_src_{what}"] = round(min(times[f"once_{what}"]) / min(times[f"src_{what}"]), 3)
    return out


def rounds_variants(model: str, reps: int, pairs: int = 4, prompt_mean: int = 64, response_mean: int = 128,
                    words: int = 32000, tokens_per_batch: int = 8192) -> dict:
    """Tokens/s of precompute's forwards (score_rows, all CPU streams) on the bench's `pairs` step pairs:
    a width batch per forward (src before rounds: a one-row batch runs on one stream) against rounds
    (pipeline.reference.forward_rounds: several batches' parts per forward, a stream each). Their
    values must agree bit for bit; peak bytes are of the whole run (weights included)."""
    import mlx.core as mx
    import numpy as np

    import mlx_dpo.pipeline.reference as reference
    from mlx_dpo.models import load_model

    m = load_model(Path(model))
    m.eval()
    rows = _id_pairs(pairs, prompt_mean, response_mean, words, seed=2)
    src_rounds = reference.forward_rounds

    def batch_rounds(widths, tokens_per_batch_, streams):  # src before rounds: one batch per forward
        return [[p.tolist() for p in np.array_split(np.array(b), min(streams, len(b)))]
                for b in reference.width_batches(widths, tokens_per_batch_)]

    def run(schedule):
        reference.forward_rounds = schedule
        try:
            return list(reference.score_rows(m, rows, max_length=None, truncation_mode="keep_start", pad_id=3,
                                             tokens_per_batch=tokens_per_batch))
        finally:
            reference.forward_rounds = src_rounds

    variants = {"batches": batch_rounds, "rounds": src_rounds}
    times, peaks, values, forwards = {name: [] for name in variants}, dict.fromkeys(variants, 0), {}, {}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, schedule in variants.items():
            mx.reset_peak_memory()
            tic = time.perf_counter()
            out = run(schedule)
            if rep:
                times[name].append(time.perf_counter() - tic)
                peaks[name] = max(peaks[name], mx.get_peak_memory())
            forwards[name] = len(out)
            values[name] = {(i, k): v[j].tobytes() for done, columns, _ in out for j, i in enumerate(done)
                            for k, v in columns.items()}
    tokens = sum(t for _, _, t in out)
    result = {"pairs": pairs, "tokens": tokens, "reps": reps, "streams": len(reference.forward_streams()),
              "values_equal": values["batches"] == values["rounds"]}
    for name in variants:
        result[f"{name}_forwards"] = forwards[name]
        result[f"{name}_s"] = round(min(times[name]), 3)
        result[f"{name}_tokens_per_s"] = round(tokens / min(times[name]), 1)
        result[f"{name}_peak_bytes"] = peaks[name]
    result["rounds_vs_batches_tokens_per_s"] = round(min(times["batches"]) / min(times["rounds"]), 3)
    return result


def _compiled_step(policy, optimizer, state, fn):
    """The train step as mlx_dpo.trainer.train compiles it (one micro-batch, no clipping)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn

    value_and_grad = nn.value_and_grad(policy, fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*arrays):
        (loss, _), grad = value_and_grad(policy, *arrays)
        optimizer.update(policy, grad)
        return loss

    return step


if __name__ == "__main__":
    task_main({f.__name__: f for f in (forward_variants, train_variants, head_variants, prompt_once_variants,
                                        rounds_variants)})
