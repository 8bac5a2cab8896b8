"""③ The reference model's log-probs for encoded rows, each sequence at a width of its own length."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .._blas import blas_threads
from ..adapters import adapters_fingerprint
from ..logps import LOGITS_CHUNK_BYTES, ROW_TILE, score_plan, sequence_logps
from ..models import load_model, quantization
from ..schemas.sequence import rejected_id_lists, truncate_sequence
from ..shapes import ladder_ceil


def dequantizes(model_path: Path) -> dict | None:
    """A quantized checkpoint's settings when the reference forward dequantizes it: on CPU, quantized
    matmuls get no BLAS (a demo precompute took 246 s quantized, 4.3 s in float32)."""
    return quantization(model_path) if mx.default_device() == mx.cpu else None


def reference_variant(model_path: Path, adapter_path: str | None, dtype: str) -> dict:
    """Identity fields beyond the weights hash, present only when used: `reference_adapters`
    (fingerprint of --adapter-path) and `reference_dequantized` (the quantization the reference was
    dequantized from, into `dtype`: the same weight values, without rounding products to the
    checkpoint's float16)."""
    fields = {}
    if adapter_path is not None:
        fields["reference_adapters"] = adapters_fingerprint(adapter_path)
    if (settings := dequantizes(model_path)) is not None:
        fields["reference_dequantized"] = {**settings, "to": dtype}
    return fields


def load_reference(model_path: Path, cfg, dtype: str):
    """The reference model of a precompute in `dtype`: the model (dequantized on CPU), plus adapters,
    in eval mode (no LoRA dropout)."""
    model = load_model(model_path, cfg.trust_remote_code, dtype, adapter_path=cfg.adapter_path,
                       dequantize=dequantizes(model_path) is not None)
    model.eval()
    return model


def sequence_width(length: int) -> int:
    """The padded width a sequence of `length` tokens is scored at, a function of its length alone. The
    model sees width - 1 positions (the last token is only a target): a multiple of ROW_TILE, so every
    matmul over the positions of a batch of this width has whole BLAS row tiles, and the attention and
    softmax sums run over the same length whatever the batch. May pass max_length by a few pads, which
    change nothing (they come after the sequence, under a causal mask)."""
    return ladder_ceil(max(length - 1, 1), ROW_TILE) + 1


def width_batches(widths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Positions grouped into batches of one width each, widest first (the memory peak comes first),
    at most max(1, tokens_per_batch // width) positions per batch, in the given order within a width."""
    groups: dict[int, list[int]] = {}
    for i, width in enumerate(widths):
        groups.setdefault(width, []).append(i)
    batches = []
    for width in sorted(groups, reverse=True):
        size = max(1, tokens_per_batch // width)
        batches += [groups[width][s : s + size] for s in range(0, len(groups[width]), size)]
    return batches


_STREAMS: list = []
# CPU streams at most: a stream per core, each running a part of every round.
MAX_STREAMS = 8


def forward_streams() -> list:
    """Where the parts of each round run: on CPU one stream per core (MLX runs each stream's non-matmul
    ops on one thread, so a single stream leaves the other cores idle outside matmuls), at most
    MAX_STREAMS; on GPU the default stream."""
    if not _STREAMS:
        count = min(MAX_STREAMS, os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1
        _STREAMS.extend([mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else [None])
    return _STREAMS


def forward_rounds(widths: list[int], tokens_per_batch: int, streams: int) -> list[list[list[int]]]:
    """The forwards of a precompute: rounds of parts, a part being positions of one width that run on a
    stream of their own, all the parts of a round in one evaluation.

    The parts are each width batch (width_batches) cut into min(streams, its rows) near-equal parts,
    in order: the parts one batch per forward ran before, so no computation changes. Consecutive parts
    share a round while it has fewer than `streams` parts and at most `tokens_per_batch` padded tokens,
    so one-row batches (a small file, whose widths rarely repeat) still give every stream work. Memory:
    a round holds at most tokens_per_batch padded tokens (or one part, of a one-row batch wider than
    that), its widest width was a batch's width, and each part's logits get LOGITS_CHUNK_BYTES //
    streams: the bounds of one batch, not of several. Example, widths [25, 13, 37, 49], ample tokens,
    2 streams: [[[3], [2]], [[0], [1]]]."""
    rounds, tokens = [], 0
    for batch in width_batches(widths, tokens_per_batch):
        for part in np.array_split(np.array(batch), min(streams, len(batch))):
            size = len(part) * widths[batch[0]]
            if rounds and len(rounds[-1]) < streams and tokens + size <= tokens_per_batch:
                rounds[-1].append(part.tolist())
                tokens += size
            else:
                rounds.append([part.tolist()])
                tokens = size
    return rounds


def parts_logps(model, parts: list[tuple], streams: list) -> list[list[np.ndarray]]:
    """sequence_logps of each part (input_ids (n, T), completion_mask (n, T), shared lengths (n,) or
    None; T - 1 a multiple of ROW_TILE), part i on streams[i], all at once in one evaluation, with
    OpenBLAS at one thread (more threads split a matmul's rows between them, each share with its own
    tail). A row's values then depend only on its own tokens and T: not on the other rows, the other
    parts or the number of streams (a part's rows are not cut to its longest, its scored positions
    start on a tile, its chunks are whole tiles). Returns per part numpy [logps, tokens(, tails)], each
    (n,). ValueError: more parts than streams."""
    if len(parts) > len(streams):
        raise ValueError(f"{len(parts)} parts for {len(streams)} streams")
    outputs = []
    for stream, (input_ids, completion_mask, shared) in zip(streams, parts):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            plan = mx.array(score_plan(completion_mask, multiple=ROW_TILE, align=ROW_TILE))
            outputs.append(sequence_logps(model, mx.array(input_ids), mx.array(completion_mask),
                                          None if shared is None else mx.array(shared), plan,
                                          budget=LOGITS_CHUNK_BYTES // len(streams)))  # the parts run at once
    with blas_threads(1):
        mx.eval(outputs)
    return [[np.array(v) for v in values] for values in outputs]


def batch_logps(model, input_ids: np.ndarray, completion_mask: np.ndarray, shared=None, streams=None):
    """parts_logps of one (N, T) batch cut into a part per stream (fewer when N is smaller). Returns
    numpy (logps, tokens[, tails]), each (N,)."""
    streams = forward_streams() if streams is None else streams
    shared = None if shared is None else np.asarray(shared)
    cuts = [rows for rows in np.array_split(np.arange(len(input_ids)), len(streams)) if len(rows)]
    outputs = parts_logps(model, [(input_ids[rows], completion_mask[rows], None if shared is None else shared[rows])
                                  for rows in cuts], streams)
    return [np.concatenate(values) for values in zip(*outputs)]


def _sequences(rows: list[dict], max_length: int | None, truncation_mode: str) -> list[tuple[list[int], list[int]]]:
    """Every row's 1+K sequences (prompt + chosen, prompt + each rejected answer), truncated, as
    (ids, completion mask), row after row."""
    return [truncate_sequence(row["prompt_ids"], answer, max_length, truncation_mode)
            for row in rows for answer in [row["chosen_ids"], *rejected_id_lists(row["rejected_ids"])]]


def score_rows(
    model,
    rows: list[dict],
    *,
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    tokens_per_batch: int,
    streams: list | None = None,
) -> Iterator[tuple[list[int], dict[str, np.ndarray], int]]:
    """Score every sequence of `rows` at its own width (sequence_width), in batches of sequences of
    one width (chosen and rejected sequences of any rows mixed), so its values are a function of its
    own tokens alone: not of its batchmates, their order, `tokens_per_batch` or the streams. The
    batches run a round at a time (forward_rounds: a part per stream, small batches sharing a round).

    Yields after each round (positions in `rows` whose sequences are now all scored, {cache column:
    values} for them, tokens the round scored, unpadded): ref_chosen_logps (B,), ref_rejected_logps
    (B,) or (B, K), their token counts, and with K = 1 the LD-DPO tail sums."""
    if not rows:
        return
    several = isinstance(rows[0]["rejected_ids"][0], list)  # K answers (a list of lists, even of one)
    per_row = 1 + len(rejected_id_lists(rows[0]["rejected_ids"]))  # sequences per row
    sequences = _sequences(rows, max_length, truncation_mode)
    scored = np.array([sum(mask[1:]) for _, mask in sequences], np.int32).reshape(-1, per_row)
    # LD-DPO's shared length (one answer): min(scored chosen tokens, scored rejected tokens) of the row
    shared = None if several else np.repeat(scored.min(axis=1), per_row)
    logps, tokens, tails = (np.zeros((len(rows), per_row), dtype) for dtype in (np.float32, np.int32, np.float32))
    missing = np.full(len(rows), per_row)
    widths = [sequence_width(len(ids)) for ids, _ in sequences]
    streams = forward_streams() if streams is None else streams
    for parts in forward_rounds(widths, tokens_per_batch, len(streams)):
        outputs = parts_logps(model, [_padded(sequences, part, widths[part[0]], pad_id, shared) for part in parts],
                              streams)
        positions = [s for part in parts for s in part]
        for target, values in zip((logps, tokens, tails), zip(*outputs)):
            target.flat[positions] = np.concatenate(values)
        owners = np.array(positions) // per_row
        np.subtract.at(missing, owners, 1)
        done = sorted({int(i) for i in owners if missing[i] == 0})
        yield done, _columns(logps[done], tokens[done], None if several else tails[done], several), \
            sum(len(sequences[s][0]) for s in positions)


def _padded(sequences: list[tuple], part: list[int], width: int, pad_id: int, shared: np.ndarray | None) -> tuple:
    """The part's sequences right-padded to `width`: input_ids, completion_mask (n, width) int32, and
    their shared lengths (n,) or None."""
    input_ids = np.full((len(part), width), pad_id, np.int32)
    completion_mask = np.zeros_like(input_ids)
    for j, s in enumerate(part):
        ids, mask = sequences[s]
        input_ids[j, : len(ids)], completion_mask[j, : len(mask)] = ids, mask
    return input_ids, completion_mask, None if shared is None else shared[part]


def _columns(logps: np.ndarray, tokens: np.ndarray, tails: np.ndarray | None, several: bool) -> dict[str, np.ndarray]:
    """(B, 1+K) values per row, chosen first -> the cache's columns: chosen (B,), rejected (B, K) for
    `several` answers, else (B,)."""
    columns = {}
    for name, values in (("ref_{}_logps", logps), ("n_{}_tokens", tokens), ("ref_{}_tail_logps", tails)):
        if values is not None:
            columns[name.format("chosen")] = values[:, 0]
            columns[name.format("rejected")] = values[:, 1:] if several else values[:, 1]
    return columns
