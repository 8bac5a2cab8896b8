"""③ The reference model's log-probs for encoded rows, in length-sorted batches."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .._blas import blas_threads
from ..adapters import adapters_fingerprint
from ..logps import LOGITS_CHUNK_BYTES, collate_pairs, sequence_logps, shared_lengths, split_chosen_rejected
from ..models import load_model, quantization
from ..schemas.sequence import pair_length


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


def length_sorted_batches(lengths: list[int], tokens_per_batch: int, sequences_per_row: int = 2) -> list[list[int]]:
    """Positions grouped so each batch's padded size (1+K sequences per row x longest) stays
    within `tokens_per_batch`. Sorting by length first keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        # The first row of a batch is its longest, so it fixes the padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and sequences_per_row * width * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


_STREAMS: list = []


def forward_streams() -> list:
    """Where the two halves of each batch run: on CPU one stream per core (MLX runs each stream's
    non-matmul ops on one thread, so a single stream leaves the second core idle outside matmuls),
    at most 2; on GPU the default stream."""
    if not _STREAMS:
        count = min(2, os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1
        _STREAMS.extend([mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else [None])
    return _STREAMS


def batch_logps(model, input_ids: np.ndarray, completion_mask: np.ndarray, shared=None, streams=None):
    """sequence_logps of a (N, T) batch, as the even rows and the odd rows, each half cut to its own
    longest row. The halves are the same whatever the number of streams they run on, so the values
    are too (bit for bit at the same BLAS threads per matmul: OpenBLAS rounds differently at 1 and 2
    threads). Returns numpy (logps, tokens[, tails]), each (N,)."""
    streams = forward_streams() if streams is None else streams
    lengths = completion_mask.shape[1] - np.argmax(completion_mask[:, ::-1] != 0, axis=1)
    halves, outputs = [np.arange(0, len(input_ids), 2), np.arange(1, len(input_ids), 2)], []
    for i, rows in enumerate(halves):
        width = int(lengths[rows].max())
        with mx.stream(streams[i % len(streams)]) if streams[0] is not None else contextlib.nullcontext():
            part = None if shared is None else mx.array(np.asarray(shared)[rows])
            outputs.append(sequence_logps(model, mx.array(input_ids[rows, :width]),
                                          mx.array(completion_mask[rows, :width]), part,
                                          budget=LOGITS_CHUNK_BYTES // 2))  # two halves may run at once
    with blas_threads(max(1, (os.cpu_count() or 1) // 2) if len(streams) > 1 else None):  # a core each
        mx.eval(outputs)
    merged = []
    for values in zip(*outputs):
        out = np.empty(len(input_ids), np.float32)
        for rows, v in zip(halves, values):
            out[rows] = np.array(v)
        merged.append(out)
    return merged


def score_rows(
    model,
    rows: list[dict],
    *,
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    tokens_per_batch: int,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Yield (positions in `rows`, {cache column: values}): ref_chosen_logps (B,),
    ref_rejected_logps (B,) or (B, K), their token counts, and with K = 1 the LD-DPO tail sums."""
    lengths = [pair_length(r) for r in rows]
    several = bool(rows) and isinstance(rows[0]["rejected_ids"][0], list)
    sequences_per_row = 1 + (len(rows[0]["rejected_ids"]) if several else 1)
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    for batch in length_sorted_batches(lengths, tokens_per_batch, sequences_per_row):
        input_ids, completion_mask = collate_pairs(
            [rows[i] for i in batch], max_length, truncation_mode, pad_id
        )
        shared = None if several else shared_lengths(completion_mask, len(batch))
        outputs = batch_logps(model, input_ids, completion_mask, shared)
        names = ["logps", "tokens", "tail_logps"]
        columns = {}
        for name, values in zip(names, outputs):
            values = np.array(values).astype(np.int32 if name == "tokens" else np.float32)
            chosen, rejected = split_chosen_rejected(values, len(batch), several)
            prefix = ("n_{}_tokens" if name == "tokens" else "ref_{}_" + name)
            columns[prefix.format("chosen")], columns[prefix.format("rejected")] = chosen, rejected
        yield batch, columns
