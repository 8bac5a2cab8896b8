"""⑤ The training loop: compiled step, reports, evaluation, saves. The model and the data are
arguments; nothing here loads a model or knows about files."""

import time
from collections.abc import Callable, Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..distributed import all_sum
from ..logps import sequence_logps, shared_lengths, split_chosen_rejected
from ..losses import preference_loss
from .stream import Batch

# Order of the metric vector the step returns; averaged over steps, then named for the report.
METRIC_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "nll_loss",
)


def make_loss_fn(loss_options: dict, ld_alpha: float | None = None):
    """loss_fn(model, input_ids, completion_mask, ref_chosen, ref_rejected) -> (mean loss, (metrics, ntoks)),
    for preference_loss(**loss_options). Metrics are computed per example, then averaged."""
    options = dict(loss_options)
    beta, reference_free = options["beta"], options.get("reference_free", False)

    def loss_fn(model, input_ids, completion_mask, ref_chosen_logps, ref_rejected_logps,
                ref_chosen_tail_logps=None, ref_rejected_tail_logps=None):
        pairs, several = ref_chosen_logps.shape[0], ref_rejected_logps.ndim == 2
        if ld_alpha is None:
            logps, ntoks = sequence_logps(model, input_ids, completion_mask)  # ((1+K)B,)
        else:  # LD-DPO (Liu et al. 2024): tokens past the shorter answer count with weight α
            logps, ntoks, tail = sequence_logps(model, input_ids, completion_mask, shared_lengths(completion_mask, pairs))
            logps = logps - (1 - ld_alpha) * tail
            ref_chosen_logps = ref_chosen_logps - (1 - ld_alpha) * ref_chosen_tail_logps
            ref_rejected_logps = ref_rejected_logps - (1 - ld_alpha) * ref_rejected_tail_logps
        policy_chosen, policy_rejected = split_chosen_rejected(logps, pairs, several)  # (B,), (B,) or (B, K)
        chosen_lengths, rejected_lengths = split_chosen_rejected(ntoks, pairs, several)
        losses = preference_loss(policy_chosen, policy_rejected, ref_chosen_logps, ref_rejected_logps,
                                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **options)
        scale = 0.0 if reference_free else 1.0
        chosen_rewards = beta * (policy_chosen - scale * ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected - scale * ref_rejected_logps)
        if several:  # accuracy and margin over every (chosen, rejected_k) comparison
            chosen_rewards = mx.broadcast_to(chosen_rewards[:, None], rejected_rewards.shape)
        metrics = mx.stack([
            losses.mean(),
            chosen_rewards.mean(),
            rejected_rewards.mean(),
            (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),  # per example, then mean
            (chosen_rewards - rejected_rewards).mean(),
            policy_chosen.mean(),
            policy_rejected.mean(),  # over all K answers
            -policy_chosen.sum() / mx.maximum(chosen_lengths.sum(), 1),  # NLL per chosen token
        ])
        return losses.mean(), (metrics, ntoks.sum())

    return loss_fn


def _arrays(batch: Batch) -> tuple[mx.array, ...]:
    arrays = [batch.input_ids, batch.completion_mask, batch.ref_chosen_logps, batch.ref_rejected_logps]
    if batch.ref_chosen_tail_logps is not None:
        arrays += [batch.ref_chosen_tail_logps, batch.ref_rejected_tail_logps]
    return tuple(mx.array(a) for a in arrays)


def evaluate(model, loss_fn, batches: Iterator[Batch], max_batches: int, group=None) -> dict:
    """Metrics averaged over pairs of up to `max_batches` batches (-1: all), summed over ranks."""
    totals, pairs, ntoks = mx.zeros(len(METRIC_NAMES)), mx.array(0.0), mx.array(0.0)
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        _, (metrics, toks) = loss_fn(model, *_arrays(batch))
        n = len(batch.indices)
        totals, pairs, ntoks = totals + metrics * n, pairs + n, ntoks + toks
        mx.eval(totals, pairs, ntoks)
    totals, pairs, ntoks = (all_sum(x, group) for x in (totals, pairs, ntoks))
    return {**dict(zip(METRIC_NAMES, (totals / mx.maximum(pairs, 1)).tolist())), "ntoks": int(ntoks.item())}


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches: Iterator[Batch],
    loss_fn: Callable,
    *,
    iters: int,
    start_step: int = 0,
    stop_after: int | None = None,
    grad_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    steps_per_report: int = 10,
    steps_per_eval: int = 100,
    steps_per_save: int = 100,
    on_report: Callable[[int, dict], None] = lambda step, metrics: None,
    on_eval: Callable[[int], None] | None = None,
    on_save: Callable[[int], None] = lambda step: None,
    group=None,
) -> None:
    """Run optimizer steps `start_step+1 .. iters`, or `.. stop_after` as if interrupted there (the
    schedule is the optimizer's and still spans `iters`). Each step consumes `grad_accumulation_steps`
    batches. Under mlx.launch (`group` of N ranks) gradients are averaged and reported metrics are
    means over ranks. Step 1 is always reported: at step 1 the policy is still the reference, so its loss
    is ln 2 and its margins 0, a check that both stages score tokens the same way."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(arrays, prev_grad):
        (loss, aux), grad = value_and_grad(model, *arrays)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        return loss, aux, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grad):
        grad = tree_map(lambda g: g / grad_accumulation_steps, grad)
        if ranks > 1:
            grad = nn.average_gradients(grad, group)
        if max_grad_norm > 0:
            grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grad, float("inf"))[1]
        optimizer.update(model, grad)
        return norm

    ranks = 1 if group is None else group.size()
    model.train()
    # ---- running sums for the next report ----
    sums, ntoks, grad_norms, steps, seconds = mx.zeros(len(METRIC_NAMES)), 0, 0.0, 0, 0.0
    last = iters if stop_after is None else min(iters, stop_after)
    for step in range(start_step + 1, last + 1):
        tic = time.perf_counter()
        # ---- forward/backward over the micro-batches, then one update ----
        grad = None
        for _ in range(grad_accumulation_steps):
            _, (metrics, toks), grad = accumulate(_arrays(next(batches)), grad)
            sums, ntoks = sums + metrics / grad_accumulation_steps, ntoks + toks
        learning_rate = optimizer.learning_rate  # the rate this step is taken with
        grad_norm = update(grad)
        mx.eval(state, sums, ntoks, grad_norm, learning_rate)
        seconds += time.perf_counter() - tic
        steps += 1
        grad_norms += grad_norm.item()

        # ---- report ----
        if step % steps_per_report == 0 or step == iters or step == 1:
            sums, ntoks = all_sum(sums, group) / ranks, all_sum(mx.array(ntoks), group).item()
            report = dict(zip(METRIC_NAMES, (sums / steps).tolist()))
            report.update(
                ntoks=int(ntoks), tokens_per_sec=int(ntoks) / seconds, learning_rate=learning_rate.item(),
                grad_norm=grad_norms / steps, peak_memory_gb=mx.get_peak_memory() / 1e9,
            )
            on_report(step, report)
            sums, ntoks, grad_norms, steps, seconds = mx.zeros(len(METRIC_NAMES)), 0, 0.0, 0, 0.0
        if on_eval is not None and (step % steps_per_eval == 0 or step == iters):
            model.eval()
            on_eval(step)
            model.train()
        if step % steps_per_save == 0 or step == last:
            on_save(step)
