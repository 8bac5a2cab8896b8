"""Bench tasks that run in the project's venv, one per process: `python bench/tasks.py TASK '{spec}'`.

matmul and numpy_matmul (figure 1), precompute (2), train with the cached or the online reference (3),
padding (4); figure 5 and the optimisations are in logps_tasks.py. Each returns a dict of numbers.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from common import cpu_per_step, lengths_shard, mlx_peak_bytes, rate_stats, step_stats, task_main

import mlx_dpo  # first: loads OpenBLAS before mlx (unless MLX_DPO_OPENBLAS=0)
from mlx_dpo.process import keep_torch_out_of_transformers


def _gflops(run, n: int, budget_s: float = 2.0) -> float:
    """GFLOP/s of the fastest of >= 3 runs (contention only slows a run down)."""
    run()  # warm up (thread pools, first-touch pages)
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / min(times) / 1e9


def matmul(sizes: list[int]) -> dict:
    """MLX float32 n x n matmul, with whatever BLAS this process got."""
    import mlx.core as mx

    out = {"blas_status": mlx_dpo.BLAS_STATUS}
    for n in sizes:
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b)
        out[f"gflops_{n}"] = round(_gflops(lambda a=a, b=b: mx.eval(a @ b), n), 1)
    return out


def numpy_matmul(sizes: list[int]) -> dict:
    import numpy as np

    out = {"numpy": np.__version__}
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        out[f"gflops_{n}"] = round(_gflops(lambda a=a: a @ a, n), 1)
    return out


def matmul_params(model) -> int:
    """Weights that take part in a matmul per token: every Linear and the LM head (the embedding when it
    is tied, as in SmolLM2), not an untied input embedding."""
    from mlx.utils import tree_flatten

    tied = getattr(model.args, "tie_word_embeddings", False)
    return sum(v.size for k, v in tree_flatten(model.parameters())
               if k.endswith("proj.weight") or k.startswith("lm_head") or (tied and k == "model.embed_tokens.weight"))


def precompute(model: str, data: str, out: str, max_length: int) -> dict:
    """`mlx-dpo precompute` through its Python entry point; the reference forward is timed on its own."""
    import mlx_dpo.pipeline.precompute as stage
    from mlx_dpo.pipeline.config import PrecomputeConfig

    batches, box = [], {}
    score_rows = stage.score_rows

    def timed_score_rows(model_, rows, **kw):  # the reference forwards alone, batch by batch
        box["model"] = model_
        it = score_rows(model_, rows, **kw)
        while True:
            tic = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            batches.append((item[2], time.perf_counter() - tic))  # the tokens this forward scored
            yield item

    stage.score_rows = timed_score_rows
    shutil.rmtree(out, ignore_errors=True)  # a cache hit would skip the forward
    cfg = PrecomputeConfig(model=model, data=data, out=out, max_length=max_length)
    tic = time.perf_counter()
    stage.precompute(cfg, log=lambda *a: None)
    total_s = time.perf_counter() - tic
    stats = rate_stats(batches)
    params = matmul_params(box["model"])
    assert stats["tokens"] == _cache_tokens(out), "timed batches do not cover the cache"
    return dict(stats, total_s=round(total_s, 2), end_to_end_tokens_per_s=round(stats["tokens"] / total_s, 1),
                matmul_params=params, model_gflops=round(2 * params * stats["tokens_per_s"] / 1e9, 1),
                best_half_model_gflops=round(2 * params * stats["best_half_tokens_per_s"] / 1e9, 1))


def _cache_tokens(cache: str) -> int:
    """Tokens of all chosen and rejected sequences (prompt included), as the forward sees them unpadded."""
    import pyarrow.parquet as pq

    total = 0
    for shard in sorted(Path(cache).glob("train/part-*.parquet")):
        for r in pq.read_table(shard, columns=["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist():
            total += 2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
    return total


def train(model: str, cache: str, fine_tune: str, online: bool, warmup: int, measured: int, out: str,
          grad_checkpoint: bool = False) -> dict:
    """Our train() on the cache; with `online`, the same trainer also loads the reference model and runs
    it inside every step (kept only here, as the baseline the cache removes)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dpo.logps import sequence_logps, split_chosen_rejected
    from mlx_dpo.models import load_model, load_tokenizer
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy
    from mlx_dpo.trainer.run import build_optimizer, open_cache
    from mlx_dpo.trainer.stream import PairStream
    from mlx_dpo.trainer.train import make_loss_fn
    from mlx_dpo.trainer.train import train as train_loop

    cfg = TrainConfig(cache=cache, model=model, output=out, fine_tune_type=fine_tune, iters=warmup + measured,
                      batch_size=4, learning_rate=1e-6, steps_per_report=1, steps_per_eval=10**9,
                      steps_per_save=10**9, grad_checkpoint=grad_checkpoint)
    manifest = open_cache(cache)
    tokenizer = load_tokenizer(Path(model))
    mx.random.seed(cfg.seed)
    policy = load_model(Path(model))
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(policy.parameters()))
    trainable = prepare_policy(policy, cfg)
    loss_fn = make_loss_fn(cfg.loss_options())
    if online:
        reference = load_model(Path(model))
        reference.freeze()
        cached_loss = loss_fn

        def loss_fn(policy_, input_ids, completion_mask, plan, ref_chosen_logps, ref_rejected_logps, weights, scale,
                    prompt=None):
            logps, _ = sequence_logps(reference, input_ids, completion_mask, plan=plan, prompt=prompt)
            chosen, rejected = split_chosen_rejected(mx.stop_gradient(logps), ref_chosen_logps.shape[0], False)
            return cached_loss(policy_, input_ids, completion_mask, plan, chosen, rejected, weights, scale, prompt=prompt)

        loss_fn.token_weight = cached_loss.token_weight

    stream = PairStream([Path(cache) / s.path for s in manifest.splits["train"].shards], batch_size=cfg.batch_size,
                        max_length=manifest.max_length, truncation_mode=manifest.truncation_mode,
                        pad_id=tokenizer.pad_token_id, shuffle=True, seed=cfg.seed, fixed_rows=True)  # as train runs it
    shapes, seconds, cpu, traced = [], [], [time.process_time()], []

    def batches():
        for _, step in stream.forever():
            batch = step[0]  # one micro-batch per step
            shapes.append((batch.input_ids.size, int(batch.completion_mask.sum()), int((batch.input_ids != tokenizer.pad_token_id).sum())))
            yield step

    train_loop(policy, build_optimizer(cfg), batches(), loss_fn, iters=cfg.iters,
               steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
               on_report=lambda step, m: (seconds.append(m["ntoks"] / m["tokens_per_sec"]), cpu.append(time.process_time()),
                                          traced.append(m["compiled_shapes"])))
    return dict(**step_stats(seconds, warmup), step_cpu_s=cpu_per_step(cpu, warmup), trainable_params=trainable,
                vocab_size=policy.args.vocab_size, grad_checkpoint=grad_checkpoint,
                padded_tokens=shapes[0][0], real_tokens=shapes[0][2], completion_tokens=shapes[0][1], compiled_shapes=traced[-1],
                ref_weight_bytes=weight_bytes, mlx_peak_bytes=mlx_peak_bytes())


def padding(cache_rows: int, prompt_mean: int, response_mean: int, out: str) -> dict:
    """Padded / total tokens of PairStream's batches over a synthetic cache of `cache_rows` pairs with the
    bench's length distribution, next to the batching of mlx-lm-lora and TRL on the same lengths."""
    import numpy as np

    from mlx_dpo.trainer.stream import PairStream

    rows, shard = lengths_shard(cache_rows, prompt_mean, response_mean, out)

    def waste(batches) -> float:
        padded = real = 0
        for ids in batches:
            padded, real = padded + ids.size, real + int((ids != 0).sum())
        return round(1 - real / padded, 4)

    out_ = {"ladders": _ladders(shard)}
    default = out_["ladders"][0]
    out_.update(compiled_shapes_b4=default["shapes"], compiled_widths_b4=default["widths"],
                compiled_shapes_b4_3_epochs=default["shapes_3_epochs"], scored_waste_b4=default["scored_waste"])
    out_.update(_packing_waste(shard))
    for batch_size in (4, 8):
        stream = PairStream([shard], batch_size=batch_size, max_length=None, truncation_mode="keep_start",
                            pad_id=0, shuffle=True, seed=0, fixed_rows=True)
        out_[f"ours_b{batch_size}"] = waste(b.input_ids for [b] in stream.epoch(0))  # the default ladder
        for multiple in (32, 8, 1):
            stream = PairStream([shard], batch_size=batch_size, max_length=None, truncation_mode="keep_start",
                                pad_id=0, shuffle=True, seed=0, pad_to_multiple=multiple, pad_ratio=1.0)
            out_[f"ours_b{batch_size}_x{multiple}"] = waste(b.input_ids for [b] in stream.epoch(0))
    # Candidate: chosen rows and rejected rows padded separately (two forwards per step, same tokens).
    stream = PairStream([shard], batch_size=4, max_length=None, truncation_mode="keep_start", pad_id=0,
                        shuffle=True, seed=0, pad_to_multiple=1)
    for multiple in (32, 8):
        padded = real = 0
        for [b] in stream.epoch(0):
            lengths = (b.input_ids != 0).sum(axis=1)
            for half in (lengths[: len(lengths) // 2], lengths[len(lengths) // 2 :]):
                padded += len(half) * -(-int(half.max()) // multiple) * multiple
                real += int(half.sum())
        out_[f"ours_b4_split_x{multiple}"] = round(1 - real / padded, 4)
    lengths = [(len(r["prompt_ids"]) + len(r["chosen_ids"]), len(r["prompt_ids"]) + len(r["rejected_ids"])) for r in rows]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i][0])  # mlx-lm-lora: sort by chosen length
    shuffled = np.random.default_rng(0).permutation(len(lengths)).tolist()  # TRL: random batches
    for name, idx in (("mlx_lm_lora_b4", order), ("trl_b4", shuffled)):
        groups = [[lengths[i] for i in idx[s : s + 4]] for s in range(0, len(idx) - 3, 4)]
        real = sum(a + b for g in groups for a, b in g)
        padded = sum(2 * len(g) * max(max(p) for p in g) for g in groups)
        out_[name] = round(1 - real / padded, 4)
    return out_


# Shape ladders measured against each other (mlx_dpo.shapes): (width multiple, width ratio, scored-position
# multiple, scored-position ratio); the first is the default, (32, 1, 64, 1) the rounding before the ladders.
LADDERS = [None, (32, 1.0, 64, 1.0), (8, 1.0, 64, 1.0), (16, 1.0625, 64, 1.0), (16, 1.0625, 64, 1.25), (32, 1.0, 64, 1.25),
           (8, 1.18, 64, 1.25), (8, 1.25, 64, 1.33), (16, 1.25, 64, 1.5)]


def _ladders(shard) -> list[dict]:
    """Per ladder, batch 4 as train streams it: padding of the token arrays and of the scored positions in
    epoch 0, its distinct widths and step input shapes; for the default, also the shapes of epochs 0-2."""
    from mlx_dpo.shapes import SCORE_MULTIPLE, SCORE_RATIO, WIDTH_MULTIPLE, WIDTH_RATIO
    from mlx_dpo.trainer.stream import PairStream

    out, default = [], (WIDTH_MULTIPLE, WIDTH_RATIO, SCORE_MULTIPLE, SCORE_RATIO)
    for ladder in [None] + [x for x in LADDERS[1:] if x != default]:
        w, wr, s, sr = ladder or default
        stream = PairStream([shard], batch_size=4, max_length=None, truncation_mode="keep_start", pad_id=0, shuffle=True,
                            seed=0, fixed_rows=True, pad_to_multiple=w, pad_ratio=wr, score_multiple=s, score_ratio=sr)
        shapes, padded, real, scored, plan = [], 0, 0, 0, 0
        for epoch in range(3 if ladder is None else 1):
            for [b] in stream.epoch(epoch):
                shapes.append((b.input_ids.shape, b.plan.shape[1]))
                if epoch == 0:
                    padded, real = padded + b.input_ids.size, real + int((b.input_ids != 0).sum())
                    scored, plan = scored + int(b.plan[2].sum()), plan + b.plan.shape[1]
            if epoch == 0:
                first = list(shapes)
        out.append(dict(default=ladder is None, width_multiple=w, width_ratio=wr, score_multiple=s, score_ratio=sr,
                        waste=round(1 - real / padded, 4), scored_waste=round(1 - scored / plan, 4),
                        widths=len({ids for ids, _ in first}), shapes=len(set(first)), shapes_3_epochs=len(set(shapes))))
    return out


def _packing_waste(shard) -> dict:
    """Padding of packed rows (mlx_dpo.packing) for PairStream's batches of 4 pairs: rows as wide as the
    batch's longest sequence, or one row per batch (width rounded up to x8), and the attention scores
    each layout computes (sum of rows x width^2; MLX's CPU attention computes masked scores too)."""
    from mlx_dpo.packing import pack_sequences
    from mlx_dpo.schemas.sequence import truncate_sequence
    from mlx_dpo.trainer.stream import PairStream, iter_rows

    rows = list(iter_rows([shard], None))
    stream = PairStream([shard], batch_size=4, max_length=None, truncation_mode="keep_start", pad_id=0,
                        shuffle=True, seed=0, pad_to_multiple=8)
    out, by_index = {}, {r["index"]: r for r in rows}
    totals = {k: [0, 0, 0] for k in ("padded_x8", "pack_longest", "pack_one_row")}  # real, padded, scores
    for [b] in stream.epoch(0):
        group = [by_index[int(i)] for i in b.indices]
        seqs = [truncate_sequence(r["prompt_ids"], r[k], None) for k in ("chosen_ids", "rejected_ids") for r in group]
        real = sum(len(ids) for ids, _ in seqs)
        longest, total = max(len(ids) for ids, _ in seqs), real
        layouts = {"padded_x8": b.input_ids.shape,
                   "pack_longest": pack_sequences(seqs, -(-longest // 8) * 8, 0)["input_ids"].shape,
                   "pack_one_row": (1, -(-total // 8) * 8)}
        for k, (n, w) in layouts.items():
            totals[k][0] += real
            totals[k][1] += n * w
            totals[k][2] += n * w * w
    for k, (real, padded, scores) in totals.items():
        out[f"{k}_waste"] = round(1 - real / padded, 4)
        out[f"{k}_attention_scores_vs_padded"] = round(scores / totals["padded_x8"][2], 2)
    return out


if __name__ == "__main__":
    keep_torch_out_of_transformers(sys.argv[1:2])  # for the train and precompute tasks, as the `mlx-dpo` command
    task_main({f.__name__: f for f in (matmul, numpy_matmul, precompute, train, padding)})
