"""THE sequence log-prob function. The pipeline (reference) and the trainer (policy) both call it,
so the two stages score the same tokens the same way.

How (see DESIGN.md "Log-probs"): the transformer body runs over the batch; then the LM head and the
vocabulary log-sum-exp run only at the scored positions (completion tokens), in chunks whose float32
[positions, V] logits stay within LOGITS_CHUNK_BYTES whatever V, recomputed in the backward pass
(a custom VJP, _token_terms) rather than stored. `plain_sequence_logps` is the direct computation over full
logits: the oracle the tests compare with, and the path for models whose head we do not recognise.
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .packing import SegmentMask
from .padding_free import row_index, rows_body
from .prompt_once import prompt_once_body
from .schemas.sequence import rejected_id_lists, truncate_sequence
from .shapes import SCORE_MULTIPLE, ladder_ceil

# Bytes of float32 logits one chunk of positions may hold: the log-prob memory above the body.
LOGITS_CHUNK_BYTES = 256 * 2**20
# mlx-lm architectures whose logits are exactly head(model.model(ids)), head = lm_head or the tied
# embedding (checked by tests/trainer/test_logps_chunked.py); others take the plain path.
HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
# Vocabulary entries per partial logsumexp (see _logsumexp).
_VOCAB_BLOCK = 512
# [chunk, V] float32 arrays alive at once at the peak, with gradients (see chunk_positions).
LIVE_CHUNK_ARRAYS = 12
# Rows per tile of the BLAS sgemm kernel: it computes a matmul's rows a tile at a time and the last
# rows % tile (its tail) with other instructions that round differently, so a position's values
# depend on where its row falls unless every matmul has whole tiles (measured: OpenBLAS 0.3.29's ZEN
# kernel, tiles of 12 rows at 1 thread; tests/pipeline/test_batch_invariance.py).
ROW_TILE = 12


def collate_pairs(
    rows: list[dict],
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    pad_to_multiple: int = 8,
    pad_ratio: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompt+chosen rows, then prompt+rejected rows, right-padded.

    Returns `input_ids` and `completion_mask`, both int32 of shape ((1+K)B, T): rows 0..B-1 are
    the chosen sequences, then B rows per rejected answer k (TRL's layout at K = 1). T is the longest
    sequence rounded up to shapes.ladder_ceil(., pad_to_multiple, pad_ratio), but never past
    `max_length` (no sequence is longer after truncation). Example, one
    row with prompt [5, 6], chosen [7], rejected [8, 9], pad 0, pad_to_multiple 1:
        input_ids       [[5, 6, 7, 0], [5, 6, 8, 9]]
        completion_mask [[0, 0, 1, 0], [0, 0, 1, 1]]
    """
    several = [rejected_id_lists(row["rejected_ids"]) for row in rows]
    completions = [[row["chosen_ids"] for row in rows]]
    completions += [[answers[k] for answers in several] for k in range(len(several[0]))]
    sequences = [
        truncate_sequence(row["prompt_ids"], completion, max_length, truncation_mode)
        for block in completions
        for row, completion in zip(rows, block)
    ]
    longest = max(len(ids) for ids, _ in sequences)
    width = ladder_ceil(longest, pad_to_multiple, pad_ratio)
    if max_length is not None and longest <= max_length:
        width = min(width, max_length)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    completion_mask = np.zeros((len(sequences), width), dtype=np.int32)
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, : len(ids)] = ids
        completion_mask[i, : len(mask)] = mask
    return input_ids, completion_mask


def split_chosen_rejected(values, pairs: int, several: bool):
    """((1+K)B,) values in collate_pairs order -> chosen (B,), rejected (B,) or (B, K)."""
    chosen, rejected = values[:pairs], values[pairs:]
    if several:
        rejected = rejected.reshape(-1, pairs).T  # (K, B) -> (B, K)
    return chosen, rejected


def _logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis in two levels: per block of _VOCAB_BLOCK entries, then over blocks.

    MLX's float32 sum on CPU accumulates a row sequentially: next to the likely token's term (~1)
    every tail term below half an ulp is dropped, so a one-shot logsumexp over a 49k
    vocabulary comes out ~1e-4 low (log-probs high, always). Each block's own max and short sum keep
    the tail. (..., V) -> (...).
    """
    v = x.shape[-1]
    whole = v - v % _VOCAB_BLOCK
    parts = []
    if whole:
        parts.append(mx.logsumexp(x[..., :whole].reshape(*x.shape[:-1], -1, _VOCAB_BLOCK), axis=-1))
    if whole < v:
        parts.append(mx.logsumexp(x[..., whole:], axis=-1, keepdims=True))
    return mx.logsumexp(mx.concatenate(parts, axis=-1), axis=-1)


def score_plan(completion_mask, multiple: int = SCORE_MULTIPLE, ratio: float = 1.0, align: int = 1) -> np.ndarray:
    """Where the scored tokens are, computed on the host from a (N, T) completion mask.

    Token t is predicted from position t-1, so the scored positions are the set entries of
    mask[:, 1:]. Returns int32 (4, M), M the count rounded up to shapes.ladder_ceil(., multiple,
    ratio) but at most N x (T-1) (the extra columns have weight 0),
    rows: index into the flattened (N, T-1) positions, sequence (its row), weight (1 or 0),
    rank (1, 2, ... along each row's scored tokens; for LD-DPO's tail).
    `align`: each row's scored positions start at a multiple of it (weight-0 columns of the row in
    between), so each lands at the same place in the LM head's BLAS row tiles whatever the other rows.
    """
    mask = np.asarray(completion_mask)[:, 1:] != 0
    rows, cols = np.nonzero(mask)
    blocks = -(-mask.sum(axis=1) // align) * align  # columns per row: its scored positions, then gaps
    used, capacity = int(blocks.sum()), mask.size
    size = ladder_ceil(used, multiple, ratio)
    plan = np.zeros((4, min(size, capacity) if capacity >= max(used, 1) else size), np.int32)
    owner = np.repeat(np.arange(len(blocks)), blocks)
    plan[:2, :used] = [owner * mask.shape[1], owner]  # gaps: the row's own first position, weight 0
    rank = np.cumsum(mask, axis=1)[rows, cols]
    slots = (np.cumsum(blocks) - blocks)[rows] + rank - 1
    plan[:, slots] = [rows * mask.shape[1] + cols, rows, np.ones(len(rows)), rank]
    return plan


def lm_head(model):
    """The model's LM head as a function hidden (..., D) -> logits (..., V), or None when its logits
    are not a plain head over `model.model` (an architecture we have not checked)."""
    if type(model).__module__ not in HEAD_MODULES:
        return None
    return model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear


def chunk_positions(vocab_size: int, budget: int = LOGITS_CHUNK_BYTES) -> int:
    """Positions per chunk so that the [positions, V] float32 temporaries stay within `budget` bytes.

    MLX's scheduler runs ahead of the computation by several ops, so the logits of one chunk, their
    exp and the next chunks' buffers are alive together: measured up to ~11 [chunk, V] float32 arrays
    at the peak with an autodiff backward, 6-8 with _token_terms's saved log-sum-exp uncompiled, and
    compiled a chunk that fills a budget of 9 arrays went 4% over it (tests/trainer/test_logps_memory.py),
    hence LIVE_CHUNK_ARRAYS = 12. A multiple of ROW_TILE, at least one
    (past the budget for V above budget / (LIVE_CHUNK_ARRAYS x 4 x ROW_TILE) bytes): with a plan of whole
    tiles, every chunk then has whole tiles, so no position's log-prob depends on where the chunk
    boundaries fall or on the budget.
    """
    rows = budget // (LIVE_CHUNK_ARRAYS * 4 * vocab_size)
    return max(ROW_TILE, rows - rows % ROW_TILE)


def _softmax_cotangent(logits: mx.array, lse: mx.array, cotangent: mx.array, targets: mx.array) -> mx.array:
    """The cotangent of the logits of log softmax(logits)[targets]: c x (onehot(t) - exp(logits - lse)).
    (P, V), (P,), (P,), (P,) -> (P, V) float32; one elementwise pass (fused by mx.compile)."""
    onehot = mx.arange(logits.shape[-1])[None] == targets[:, None]
    return cotangent[:, None] * (onehot - mx.exp(logits - lse[:, None]))


_softmax_cotangent_fused = mx.compile(_softmax_cotangent)


def _token_terms(head, hidden: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """log softmax(head(hidden))[targets] for (M, D) hidden and (M,) targets -> (M,) float32.

    A custom VJP: forward and backward each walk the positions `chunk` at a time, one chunk after
    the other (mx.depends; a free scheduler would interleave them and hold every chunk's logits).
    The forward keeps each position's log-sum-exp (M floats); the backward recomputes a chunk's
    logits once and forms their cotangent directly (_softmax_cotangent: one exp pass, where the
    autodiff of the forward took two and a scatter), then pulls it through the head alone. The
    head's trainable weights (a tied embedding being trained, say) get their gradient too.
    """
    module = getattr(head, "__self__", head)  # the embedding behind a tied head's as_linear
    keys = [k for k, _ in tree_flatten(module.trainable_parameters())]
    starts = range(0, hidden.shape[0], chunk)

    def logits_of(h, leaves):
        if keys:
            module.update(tree_unflatten(list(zip(keys, leaves))))
        return head(h).astype(mx.float32)  # (chunk, V): the only [positions, V] temporary

    def joined(parts):
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    @mx.custom_function
    def scored(hidden, targets, *leaves):
        terms, norms = [], []
        for s in starts:
            h = hidden[s : s + chunk] if not terms else mx.depends(hidden[s : s + chunk], terms[-1])
            logits = logits_of(h, leaves)
            norms.append(_logsumexp(logits))
            terms.append(mx.take_along_axis(logits, targets[s : s + chunk, None], axis=-1)[:, 0] - norms[-1])
        return joined(terms), joined(norms)  # the log-sum-exps: for the backward

    @scored.vjp
    def scored_vjp(primals, cotangents, outputs):
        hidden, targets, *leaves = primals
        cotangent, lse = cotangents[0], outputs[1]
        grads, leaf_grads = [], [mx.zeros_like(v) for v in leaves]
        for s in starts:
            # after the previous chunk's gradients, the head's running sum included: else every chunk's
            # (V, D) head gradient is alive at once (a trainable head: full fine-tuning, tied embeddings)
            h = hidden[s : s + chunk] if not grads else mx.depends(hidden[s : s + chunk], [grads[-1], *leaf_grads])
            g = _softmax_cotangent_fused(logits_of(h, leaves), lse[s : s + chunk], cotangent[s : s + chunk],
                                         targets[s : s + chunk])
            # The head's own VJP; the logits it would recompute are never used, so never evaluated.
            _, (gh, *gl) = mx.vjp(lambda h, *lv: logits_of(h, lv), [h, *leaves], [g])
            grads.append(gh)
            leaf_grads = [a + b for a, b in zip(leaf_grads, gl)]
        return (joined(grads), mx.zeros_like(targets), *leaf_grads)

    leaves = [v for _, v in tree_flatten(module.trainable_parameters())]
    return scored(hidden, targets, *leaves)[0]


def sequence_logps(
    model, input_ids: mx.array, completion_mask: mx.array, shared_lengths: mx.array | None = None,
    plan: mx.array | None = None, *, budget: int = LOGITS_CHUNK_BYTES,
    segments: mx.array | None = None, sequences: int | None = None,
    prompt: tuple[mx.array, mx.array] | None = None, widths: tuple[int, ...] | None = None,
) -> tuple[mx.array, ...]:
    """Sum of log p(token | prefix) over completion tokens, per sequence.

    input_ids, completion_mask: (N, T). Token t is predicted from position t-1, so position 0 is
    never scored. Right padding needs no attention mask: under a causal mask, pads only come after
    the real tokens. `plan`: score_plan(completion_mask) as an mx array; required inside a compiled
    function (the positions come from the host), built here otherwise. Returns (logps (N,), token
    counts (N,)); with `shared_lengths` (N,), also the sum over completion tokens past the first
    shared_lengths ones (the "tail" of LD-DPO, Liu et al. 2024).
    Packed rows (mlx_dpo.packing): `segments` (N, T) and `plan` from pack_sequences, and the number
    of packed `sequences`; the results are then per sequence.
    The prompt once per pair (mlx_dpo.prompt_once): `prompt` = (prompt_ids, prompt_mask) (B, P) and
    input_ids, completion_mask the answer rows, all from collate_prompt_once.
    Padding-free (mlx_dpo.padding_free): `widths`, padding_free.row_widths(completion_mask); the body
    then runs each row alone at its own width (plain rows only: with segments= or prompt= a ValueError).
    """
    if widths is not None and (segments is not None or prompt is not None):
        raise ValueError("padding-free rows (widths=) run plain rows: not packed rows (segments=) or shared prompts (prompt=)")
    head = lm_head(model)
    if head is None:
        if segments is not None or prompt is not None or widths is not None:
            raise ValueError(f"{type(model).__module__}: packed rows, shared prompts or padding-free rows are not "
                             "supported for this architecture")
        return plain_sequence_logps(model, input_ids, completion_mask, shared_lengths)
    index, sequence, weight, rank = mx.array(score_plan(np.asarray(completion_mask))) if plan is None else plan
    n = input_ids.shape[0] if sequences is None else sequences
    targets = input_ids[:, 1:].reshape(-1)[index]  # (M,)
    if widths is not None:  # each row alone, at its own width
        hidden = rows_body(model, input_ids[:, :-1], widths)[row_index(index, widths, input_ids.shape[1] - 1)]
    elif prompt is not None:
        hidden = prompt_once_body(model, *prompt, input_ids[:, :-1])  # (N, T-1, D)
    elif segments is None:
        hidden = model.model(input_ids[:, :-1])  # (N, T-1, D)
    else:  # one stand-in cache per layer, all making the same block-diagonal mask
        hidden = model.model(input_ids[:, :-1], cache=[SegmentMask(segments[:, :-1])] * len(model.layers))
    if widths is None:
        hidden = hidden.reshape(-1, hidden.shape[-1])[index]  # (M, D)
    vocab = model.args.vocab_size
    terms = _token_terms(head, hidden, targets, chunk_positions(vocab, budget)) * weight
    sums = mx.zeros((n,), mx.float32).at[sequence].add(terms)
    counts = mx.zeros((n,), mx.float32).at[sequence].add(weight.astype(mx.float32))
    if shared_lengths is None:
        return sums, counts
    past = rank > shared_lengths[sequence]
    return sums, counts, mx.zeros((n,), mx.float32).at[sequence].add(terms * past)


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log softmax(logits)[targets] in float32. logits: (N, T, V); targets: (N, T) -> (N, T)."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(mx.float32)
    return picked - _logsumexp(logits.astype(mx.float32))


def plain_sequence_logps(
    model, input_ids: mx.array, completion_mask: mx.array, shared_lengths: mx.array | None = None
) -> tuple[mx.array, ...]:
    """sequence_logps computed directly: the model's full (N, T-1, V) logits, a log-softmax
    normaliser at every position, then the completion mask. The oracle of the tests."""
    logits = model(input_ids[:, :-1])  # (N, T-1, V)
    mask = completion_mask[:, 1:].astype(mx.float32)
    per_token = token_logps(logits, input_ids[:, 1:]) * mask  # (N, T-1)
    sums, counts = per_token.sum(axis=-1), mask.sum(axis=-1)
    if shared_lengths is None:
        return sums, counts
    position = mx.cumsum(mask, axis=-1)  # 1, 2, ... along each completion
    tail = (per_token * (position > shared_lengths[:, None])).sum(axis=-1)
    return sums, counts, tail


def shared_lengths(completion_mask, pairs: int):
    """LD-DPO's shared length of each (chosen, rejected) pair, for every row of a K = 1 batch:
    min(scored chosen tokens, scored rejected tokens), repeated for the chosen and rejected halves."""
    counts = completion_mask[:, 1:].sum(axis=-1)
    shared = mx.minimum(counts[:pairs], counts[pairs:]) if isinstance(counts, mx.array) else \
        np.minimum(counts[:pairs], counts[pairs:])
    return mx.concatenate([mx.array(shared)] * 2)
