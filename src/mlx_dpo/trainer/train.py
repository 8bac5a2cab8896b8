"""⑤ The training loop: compiled step, reports, evaluation, saves. The model and the data are
arguments; nothing here loads a model or knows about files.

A step's loss is a mean over the pairs of its global batch (per-pair terms) plus a mean over their
chosen completion tokens (per-token terms: sft, --rpo-alpha). Every micro-batch on every rank adds
its sums divided by the global counts, so the step's loss, gradient and metrics do not depend on
how the global batch is split into ranks and micro-batches, nor on its size."""

import math
import time
from collections.abc import Callable, Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..distributed import all_gather_indices, all_sum, all_sum_tree
from ..errors import UserError
from ..logps import sequence_logps, shared_lengths, split_chosen_rejected
from ..losses import preference_loss, split_token_losses
from .stream import Batch

# Metrics reported, TRL's names. The step vector holds, in order: the per-pair part of the loss,
# the per-pair metrics below, and the chosen NLL per token; "loss" adds the token part.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
METRIC_NAMES = ("loss", *PAIR_METRICS, "nll_loss")
# Non-finite steps in a row that end the run: one is skipped, a run of them is a diverged run.
MAX_SKIPPED_IN_A_ROW = 3


def make_loss_fn(loss_options: dict, ld_alpha: float | None = None):
    """loss_fn(model, input_ids, completion_mask, plan, ref_chosen, ref_rejected, weights, scale[, tails], prompt=None)
    -> (loss, (metrics, ntoks)) for preference_loss(**loss_options).

    `weights` (B,) are the pairs' weights (0 for stand-in rows); `scale` (2,) is 1 / (global pairs,
    global chosen tokens) of the step. The loss is Σ w·pair_loss·scale[0] + token_weight·Σ w·NLL·scale[1];
    `metrics` is the step vector of METRIC_NAMES (see `named_metrics`), summable over micro-batches
    and ranks. `loss_fn.token_weight` is the summed weight of the per-token terms. `prompt`: (prompt_ids,
    prompt_mask) of a batch laid out once per pair (Batch.prompt_ids), input_ids then its answer rows. `widths`:
    padding-free rows (mlx_dpo.padding_free; bench/padding_free.py measures them, train does not run them)."""
    options = dict(loss_options)
    beta, reference_free = options["beta"], options.get("reference_free", False)
    pair_types, pair_weights, token_weight = split_token_losses(options.pop("loss_type"), options.pop("loss_weights", None))

    def loss_fn(model, input_ids, completion_mask, plan, ref_chosen_logps, ref_rejected_logps, weights, scale,
                ref_chosen_tail_logps=None, ref_rejected_tail_logps=None, pair_values=False, prompt=None,
                widths=None):
        pairs, several = ref_chosen_logps.shape[0], ref_rejected_logps.ndim == 2
        if ld_alpha is None:
            plain, ntoks = sequence_logps(model, input_ids, completion_mask, plan=plan, prompt=prompt, widths=widths)  # ((1+K)B,)
            logps = plain
        else:  # LD-DPO (Liu et al. 2024): tokens past the shorter answer count with weight α
            shared = shared_lengths(completion_mask, pairs)
            plain, ntoks, tail = sequence_logps(model, input_ids, completion_mask, shared, plan=plan, prompt=prompt,
                                                widths=widths)
            logps = plain - (1 - ld_alpha) * tail
            ref_chosen_logps = ref_chosen_logps - (1 - ld_alpha) * ref_chosen_tail_logps
            ref_rejected_logps = ref_rejected_logps - (1 - ld_alpha) * ref_rejected_tail_logps
        policy_chosen, policy_rejected = split_chosen_rejected(logps, pairs, several)  # (B,), (B,) or (B, K)
        chosen_lengths, rejected_lengths = split_chosen_rejected(ntoks, pairs, several)
        if pair_types:
            pair_losses = preference_loss(
                policy_chosen, policy_rejected, ref_chosen_logps, ref_rejected_logps, loss_type=pair_types,
                loss_weights=pair_weights, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **options)
        else:
            pair_losses = mx.zeros((pairs,))
        # The NLL is the plain one, LD-DPO weights only the preference term.
        nll_sum = -(weights * plain[:pairs]).sum()  # over the chosen tokens of real pairs
        scale_ref = 0.0 if reference_free else 1.0
        chosen_rewards = beta * (policy_chosen - scale_ref * ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected - scale_ref * ref_rejected_logps)
        versus = chosen_rewards[:, None] if several else chosen_rewards  # against each rejected answer
        per_pair = [chosen_rewards, rejected_rewards, versus > rejected_rewards, versus - rejected_rewards,
                    policy_chosen, policy_rejected]
        # with K rejected answers: per pair means over the K (accuracy, margin, rejected values)
        per_pair = mx.stack([v.astype(mx.float32).reshape(pairs, -1).mean(axis=1) for v in per_pair])  # (6, B)
        pair_sum = (weights * pair_losses).sum()
        metrics = mx.concatenate([mx.stack([pair_sum]) * scale[0], (per_pair * weights).sum(axis=1) * scale[0],
                                  mx.stack([nll_sum]) * scale[1]])
        loss = pair_sum * scale[0] + token_weight * nll_sum * scale[1]
        k = ntoks.shape[0] // pairs
        if pair_values:  # evaluation only: the per-pair values behind the metrics, for eval_pairs.parquet
            return loss, (metrics, (mx.tile(weights, k) * ntoks).sum(), dict(
                policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen_logps,
                ref_rejected=ref_rejected_logps, reward_margin=versus - rejected_rewards))
        return loss, (metrics, (mx.tile(weights, k) * ntoks).sum())

    loss_fn.token_weight = token_weight
    return loss_fn


def named_metrics(vector: list[float], token_weight: float) -> dict:
    """The step vector as TRL's metric names; loss = per-pair part + token_weight × NLL per token."""
    return {"loss": vector[0] + token_weight * vector[-1], **dict(zip(PAIR_METRICS, vector[1:-1])),
            "nll_loss": vector[-1]}


def _arrays(batch: Batch, scale) -> tuple[mx.array, ...]:
    arrays = [batch.input_ids, batch.completion_mask, batch.plan, batch.ref_chosen_logps, batch.ref_rejected_logps,
              batch.weights]
    tails = [batch.ref_chosen_tail_logps, batch.ref_rejected_tail_logps] if batch.ref_chosen_tail_logps is not None else []
    return (*(mx.array(a) for a in arrays), scale, *(mx.array(a) for a in tails))


def _prompt(batch: Batch) -> tuple[mx.array, mx.array] | None:
    """The batch's shared prompts (laid out once per pair), or None for plain prompt+answer rows."""
    return None if batch.prompt_ids is None else (mx.array(batch.prompt_ids), mx.array(batch.prompt_mask))


def evaluate(model, loss_fn, steps: Iterator[list[Batch]], group=None, on_pairs=None) -> dict:
    """Metrics over every pair of `steps` (all ranks): sums, then divided by the global counts.
    `on_pairs(indices, values, weights, caches)` receives each batch's per-pair values (make_loss_fn:
    pair_values); `caches` is None, or with several caches which one each pair is from."""
    totals, counts, ntoks = mx.zeros(len(METRIC_NAMES)), np.zeros(2), mx.array(0.0)
    for batches in steps:
        for batch in batches:
            _, (metrics, toks, *values) = loss_fn(model, *_arrays(batch, mx.array([1.0, 1.0])),
                                                  pair_values=on_pairs is not None, prompt=_prompt(batch))
            if on_pairs is not None:
                on_pairs(batch.indices, values[0], batch.weights, batch.caches)
            totals, ntoks = totals + metrics, ntoks + toks
            counts += batch.counts()
            mx.eval(totals, ntoks)
    totals, counts, ntoks = all_sum(totals, group), all_sum(mx.array(counts, dtype=mx.float32), group), all_sum(ntoks, group)
    divide = mx.concatenate([mx.full(len(METRIC_NAMES) - 1, counts[0]), counts[1:]])
    vector = (totals / mx.maximum(divide, 1)).tolist()
    return {**named_metrics(vector, loss_fn.token_weight), "ntoks": int(ntoks.item())}


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches: Iterator[list[Batch]],
    loss_fn: Callable,
    *,
    iters: int,
    start_step: int = 0,
    stop_after: int | None = None,
    max_grad_norm: float = 1.0,
    steps_per_report: int = 10,
    steps_per_eval: int = 100,
    steps_per_save: int = 100,
    on_report: Callable[[int, dict], None] = lambda step, metrics: None,
    on_eval: Callable[[int], None] | None = None,
    on_save: Callable[[int, list[int] | None], None] = lambda step, cache_pairs: None,
    on_skip: Callable[[int, dict], None] = lambda step, info: None,
    group=None,
    cache_pairs: list[int] | None = None,
) -> None:
    """Run optimizer steps `start_step+1 .. iters`, or `.. stop_after` as if interrupted there (the
    schedule is the optimizer's and still spans `iters`). Each item of `batches` is this rank's
    micro-batches of one global batch (a step). Under mlx.launch (`group` of N ranks) gradients and
    metrics are summed over ranks, each already divided by the global counts. A step whose loss,
    gradient norm or any metric of METRIC_NAMES is not finite is skipped (weights and optimizer state untouched) and passed to `on_skip`;
    MAX_SKIPPED_IN_A_ROW in a row raise UserError. Step 1 is always reported: at step 1 the policy is
    still the reference, so its loss is ln 2 and its margins 0, a check that both stages score tokens
    the same way. With several caches (batches carrying pairs_per_cache) each report adds
    `pairs_per_cache`: the pairs of the applied steps since the last report, per cache, in cache order
    (`on_save` gets those not yet reported, and a resumed run passes them back as `cache_pairs`);
    a skipped step's info adds `caches`: the cache number of each of its `indices`. Each report also
    gives `compiled_shapes`: the distinct input shapes the compiled step has been traced for so far in
    this process (mlx_dpo.shapes keeps them few)."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(arrays, prompt, prev_grad):
        (loss, aux), grad = value_and_grad(model, *arrays, prompt=prompt)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        return loss, aux, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def reduce(grad, metrics):
        grad, metrics = all_sum_tree(grad, group), all_sum(metrics, group)
        norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grad)))
        return grad, metrics, norm

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grad, norm):
        if max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_'s factor
            factor = mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
            grad = tree_map(lambda g: g * factor.astype(g.dtype), grad)
        optimizer.update(model, grad)
        return optimizer.state["learning_rate"]  # the rate this update used

    model.train()
    traced = set()  # input signatures of `accumulate`: mx.compile traces it once for each
    # ---- running sums for the next report ----
    sums, ntoks, grad_norms, steps, seconds, skipped = mx.zeros(len(METRIC_NAMES)), 0, 0.0, 0, 0.0, 0
    # with several caches: pairs trained from each since the last report (a resume: since the one before it)
    cache_pairs = None if cache_pairs is None else np.array(cache_pairs, dtype=np.float64)
    learning_rate = math.nan
    last = iters if stop_after is None else min(iters, stop_after)
    for step in range(start_step + 1, last + 1):
        tic = time.perf_counter()
        # ---- global counts, forward/backward over the micro-batches, sums over ranks ----
        micro = next(batches)
        counts = sum(b.counts() for b in micro)
        if mixture := micro[0].pairs_per_cache is not None:  # several caches: the pairs from each too
            counts = np.concatenate([counts, sum(b.pairs_per_cache for b in micro)])
        counts = all_sum(mx.array(counts, dtype=mx.float32), group)
        scale = 1.0 / mx.maximum(counts[:2], 1.0)
        grad, metrics, toks = None, mx.zeros(len(METRIC_NAMES)), mx.array(0.0)
        for batch in micro:
            arrays, prompt = _arrays(batch, scale), _prompt(batch)
            traced.add((grad is None, *(a.shape for a in (*arrays, *(prompt or ())))))  # the prompt width too
            _, (batch_metrics, batch_toks), grad = accumulate(arrays, prompt, grad)
            metrics, toks = metrics + batch_metrics, toks + batch_toks
        grad, metrics, grad_norm = reduce(grad, mx.concatenate([metrics, toks[None]]))
        mx.eval(grad, metrics, grad_norm)
        vector, norm = metrics.tolist(), grad_norm.item()
        report = named_metrics(vector[:-1], loss_fn.token_weight)
        # ---- skip a step whose loss, gradient or any reported metric is not finite; several in a row end the run ----
        bad = [name for name, value in report.items() if not math.isfinite(value)] + ([] if math.isfinite(norm) else ["grad_norm"])
        if bad:
            skipped += 1
            indices = all_gather_indices([i for b in micro for i in b.real_indices()], group)
            info = {"loss": report["loss"], "grad_norm": norm, "non_finite": bad, "indices": indices}
            if mixture:  # an index alone does not say which cache: their numbers, in the same order
                info["caches"] = all_gather_indices([int(c) for b in micro for c, w in zip(b.caches, b.weights) if w > 0], group)
            on_skip(step, info)
            if skipped >= MAX_SKIPPED_IN_A_ROW:
                raise UserError(f"step {step}: {skipped} steps in a row with a non-finite loss, gradient or metric "
                                f"(last batch rows {indices}); lower --learning-rate or check the cache")
        else:
            skipped = 0
            learning_rate = apply(grad, grad_norm)
            mx.eval(state, learning_rate)
            sums, ntoks, grad_norms, steps = sums + metrics[:-1], ntoks + vector[-1], grad_norms + norm, steps + 1
            if mixture:
                step_pairs = np.array(counts[2:].tolist())
                cache_pairs = step_pairs if cache_pairs is None else cache_pairs + step_pairs
        seconds += time.perf_counter() - tic

        # ---- report ----
        if (step % steps_per_report == 0 or step == iters or step == 1) and steps > 0:
            report = named_metrics((sums / steps).tolist(), loss_fn.token_weight)
            report.update(
                ntoks=int(ntoks), tokens_per_sec=ntoks / seconds, learning_rate=learning_rate.item(),
                grad_norm=grad_norms / steps, peak_memory_gb=mx.get_peak_memory() / 1e9, compiled_shapes=len(traced),
            )
            if cache_pairs is not None:
                report["pairs_per_cache"] = [int(n) for n in cache_pairs]
            on_report(step, report)
            sums, ntoks, grad_norms, steps, seconds, cache_pairs = mx.zeros(len(METRIC_NAMES)), 0, 0.0, 0, 0.0, None
        if on_eval is not None and (step % steps_per_eval == 0 or step == iters):
            model.eval()
            on_eval(step)
            model.train()
        if step % steps_per_save == 0 or step == last:
            on_save(step, None if cache_pairs is None else [int(n) for n in cache_pairs])
