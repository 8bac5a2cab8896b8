"""The prompt once per pair: the answers of a pair (chosen and its K rejected) attend to one pass over
their shared prompt instead of each carrying a copy of it.

Two passes of the transformer body, each given a stand-in per-layer cache (as mlx_dpo.packing does;
no model code changes): the prompt pass runs the B prompts, minus their last token, left-padded to a
common width P; each layer's stand-in keeps that layer's keys and values. The answer pass runs the
(1+K)B answer rows [last prompt token, answer tokens, right padding] at RoPE offset P; each layer's
stand-in hands the attention [its pair's prompt keys/values; the row's own], and the mask lets a row
see the real (non-pad) prompt tokens and its own earlier tokens. A row's positions are those of the
plain sequence shifted by a constant (P - prompt length + 1), and RoPE scores depend only on relative
positions, so the log-probs are those of the plain computation to float rounding; the gradient flows
back through the prompt keys/values into the prompt pass. Starting the answer rows with the last
prompt token lays them out exactly as a collate_pairs batch (token t scored from position t-1), so
score_plan, shared_lengths and split_chosen_rejected apply to them unchanged.
Architectures where this was checked: SHARED_PROMPT_MODULES (tests/trainer/test_prompt_once.py).
"""

import mlx.core as mx
import numpy as np

from .schemas.sequence import rejected_id_lists, truncate_sequence
from .shapes import ladder_ceil

SHARED_PROMPT_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def can_share_prompt(model) -> bool:
    return type(model).__module__ in SHARED_PROMPT_MODULES


def collate_prompt_once(
    rows: list[dict], max_length: int | None, truncation_mode: str, pad_id: int,
    pad_to_multiple: int = 8, pad_ratio: float = 1.0,
) -> dict[str, np.ndarray] | None:
    """The batch of collate_pairs split into one prompt per pair and the answer rows, or None when the
    answers of a pair do not share their prompt after truncation (keep_end cut them differently) or a
    prompt is empty (its first answer token is not scored).

    Returns int32 arrays: prompt_ids and prompt_mask (B, P), each prompt but its last token, left-padded
    (mask 1 on real tokens; P >= 1); input_ids and completion_mask ((1+K)B, W), rows in collate_pairs
    order, each [last prompt token, answer, right padding] with the mask 1 on the answer. Widths are
    rounded up by shapes.ladder_ceil(., pad_to_multiple, pad_ratio). Example, one row with prompt
    [5, 6], chosen [7], rejected [8, 9], pad 0, pad_to_multiple 1:
        prompt_ids [[5]], prompt_mask [[1]]
        input_ids [[6, 7, 0], [6, 8, 9]], completion_mask [[0, 1, 0], [0, 1, 1]]
    """
    prompts, answers = [], []  # per pair: the prompt; per sequence: the answer (collate_pairs order)
    for block in range(1 + len(rejected_id_lists(rows[0]["rejected_ids"]))):
        for b, row in enumerate(rows):
            answer = row["chosen_ids"] if block == 0 else rejected_id_lists(row["rejected_ids"])[block - 1]
            ids, mask = truncate_sequence(row["prompt_ids"], answer, max_length, truncation_mode)
            start = mask.index(1) if 1 in mask else len(ids)
            if block == 0:
                prompts.append(ids[:start])
            elif ids[:start] != prompts[b]:
                return None
            answers.append(ids[start:])
    if not all(prompts):
        return None
    width = ladder_ceil(max(len(p) for p in prompts) - 1, pad_to_multiple, pad_ratio)
    prompt_ids = np.full((len(rows), width), pad_id, np.int32)
    prompt_mask = np.zeros((len(rows), width), np.int32)
    for b, prompt in enumerate(prompts):
        if len(prompt) > 1:  # left padding: every prompt ends at the last column
            prompt_ids[b, width - len(prompt) + 1 :] = prompt[:-1]
            prompt_mask[b, width - len(prompt) + 1 :] = 1
    width = ladder_ceil(1 + max(len(a) for a in answers), pad_to_multiple, pad_ratio)
    input_ids = np.full((len(answers), width), pad_id, np.int32)
    completion_mask = np.zeros((len(answers), width), np.int32)
    for i, answer in enumerate(answers):
        input_ids[i, : 1 + len(answer)] = [prompts[i % len(rows)][-1], *answer]
        completion_mask[i, 1 : 1 + len(answer)] = 1
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, input_ids=input_ids, completion_mask=completion_mask)


class PromptKeys:
    """Stands in for one layer's cache in the prompt pass: keeps the layer's keys and values, and masks
    the left padding as keys. A pad query sees itself, so no softmax row is empty (no NaN)."""

    offset = 0

    def __init__(self, real: mx.array):
        self.real = real.astype(mx.bool_)  # (B, P)
        self.keys = self.values = None

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        q, k = mx.arange(n)[:, None], mx.arange(n)[None]
        allowed = q >= k
        if window_size is not None:
            allowed = allowed & (q < k + window_size)
        return (allowed & (self.real[:, None, :] | (q == k)))[:, None]  # (B, 1, n, n)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values  # (B, heads, P, head_dim)
        return keys, values


class AnswerKeys:
    """Stands in for one layer's cache in the answer pass, rows (1+K)B in blocks of B (row r answers
    pair r % B): RoPE offset P, keys/values [the pair's prompt ones; the row's own], and a mask that
    allows the real prompt tokens and the row's earlier tokens."""

    def __init__(self, prompt: PromptKeys, answers: int):
        self.prompt, self.answers = prompt, answers
        self.offset = prompt.real.shape[1]

    def _repeat(self, x: mx.array) -> mx.array:
        return mx.tile(x, (self.answers,) + (1,) * (x.ndim - 1))  # (B, ...) -> ((1+K)B, ...)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        p = self.offset
        q, k = mx.arange(p, p + n)[:, None], mx.arange(p + n)[None]
        allowed = q >= k  # (n, P + n)
        if window_size is not None:
            allowed = allowed & (q < k + window_size)
        real = mx.concatenate([self.prompt.real, mx.ones((self.prompt.real.shape[0], n), mx.bool_)], axis=1)
        return (allowed[None] & self._repeat(real)[:, None, :])[:, None]  # ((1+K)B, 1, n, P + n)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return (mx.concatenate([self._repeat(self.prompt.keys), keys], axis=2),
                mx.concatenate([self._repeat(self.prompt.values), values], axis=2))


def prompt_once_body(model, prompt_ids: mx.array, prompt_mask: mx.array, answer_ids: mx.array) -> mx.array:
    """model.model's hidden states of the answer rows, (N, L, D), N = (1+K)B, the prompt run once.

    prompt_ids, prompt_mask: (B, P) from collate_prompt_once; answer_ids: (N, L), its input_ids
    without the last column (as sequence_logps runs input_ids[:, :-1])."""
    prompts = [PromptKeys(prompt_mask) for _ in model.layers]
    model.model(prompt_ids, cache=prompts)  # only its keys and values are used
    answers = answer_ids.shape[0] // prompt_ids.shape[0]
    return model.model(answer_ids, cache=[AnswerKeys(p, answers) for p in prompts])
