"""A cached sequence's reference values are a function of its own token ids (and the model and settings),
bit for bit: not of the other rows in the file, their order, the shards, --tokens-per-batch, the number of
CPU streams, or the other answers of its row. So a reused row equals a fresh precompute of it exactly
(issue 14 item 1)."""

import json

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq

import tiny_models
from mlx_dpo.models import load_model
from mlx_dpo.pipeline.reference import batch_logps, score_rows, sequence_width

VALUES = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps",
          "n_chosen_tokens", "n_rejected_tokens")


def other_rows() -> list[dict]:
    """Other batchmates for the standard rows: the same texts cut and doubled, so other lengths."""
    rows = tiny_models.standard_rows()
    return [{"prompt": r["prompt"][: len(r["prompt"]) // 2], "chosen": r["chosen"] * 2, "rejected": r["rejected"]}
            for r in rows] + [{"prompt": r["prompt"] + r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}
                              for r in rows[::3]]


def cached(out) -> dict:
    """{(prompt, chosen, rejected ids): row} over every split of a cache."""
    table = pq.read_table(sorted(out.glob("*/part-*.parquet")))
    return {json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]): r for r in table.to_pylist()}


def test_values_do_not_depend_on_batchmates_order_shards_or_tokens_per_batch(tiny_model_dir, tmp_path):
    standard, others = tiny_models.standard_rows(), other_rows()
    mixed = [row for pair in zip(standard[::-1], others) for row in pair] + others[len(standard):]
    runs = {"alone": (standard, []),
            "mixed": (mixed, ["--tokens-per-batch", 48, "--rows-per-shard", 5]),  # one sequence per forward
            "together": (standard + others, ["--tokens-per-batch", 100000])}
    caches = {}
    for name, (rows, extra) in runs.items():
        data = tiny_models.write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / name / "cache"
        tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out,
                            "--max-length", 40, "--no-reuse", *extra)
        caches[name] = cached(out)
    alone = caches["alone"]
    assert len(alone) >= 10
    for name in ("mixed", "together"):
        for key, row in alone.items():
            assert {c: caches[name][key][c] for c in VALUES} == {c: row[c] for c in VALUES}, (name, key)


def test_values_do_not_depend_on_streams_or_the_other_answers_of_a_row(tiny_model_dir, standard_cache):
    """score_rows itself: on one stream and one sequence per forward, the standard cache's values (two
    streams, whole shards per forward); a row of K = 2 answers [rejected, chosen], in forwards of
    other sizes, gets the values its chosen and rejected sequences got in the K = 1 cache."""
    rows = list(cached(standard_cache).values())
    model = load_model(tiny_model_dir)
    settings = dict(max_length=22, truncation_mode="keep_start", pad_id=0)
    scored = list(score_rows(model, rows[::-1], tokens_per_batch=1, streams=[None], **settings))
    values = {}
    for positions, columns, _ in scored:
        for j, i in enumerate(positions):
            values[len(rows) - 1 - i] = {c: columns[c][j].item() for c in VALUES}
    assert values == {i: {c: row[c] for c in VALUES} for i, row in enumerate(rows)}

    several = [{**row, "rejected_ids": [row["rejected_ids"], row["chosen_ids"]]} for row in rows]
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    scored = list(score_rows(model, several, tokens_per_batch=64, streams=streams, **settings))
    assert sorted(i for positions, _, _ in scored for i in positions) == list(range(len(rows)))
    for positions, columns, _ in scored:
        for j, i in enumerate(positions):
            row = rows[i]
            assert columns["ref_chosen_logps"][j].item() == row["ref_chosen_logps"]
            assert columns["ref_rejected_logps"][j].tolist() == [row["ref_rejected_logps"], row["ref_chosen_logps"]]
            assert columns["n_rejected_tokens"][j].tolist() == [row["n_rejected_tokens"], row["n_chosen_tokens"]]


def test_a_small_file_on_two_streams_equals_each_sequence_scored_alone(tiny_model_dir):
    """The bench's case: 4 pairs whose 8 sequences have 8 widths, so each forward on two streams holds
    sequences of two widths (pipeline.reference.forward_rounds). Each sequence's values equal a forward
    of it alone, one row on one stream, bit for bit."""
    model = load_model(tiny_model_dir)
    rows = tiny_models.small_file_ids(model.args.vocab_size)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    settings = dict(max_length=None, truncation_mode="keep_start", pad_id=0, tokens_per_batch=8192)
    values = {}
    for positions, columns, _ in score_rows(model, rows, streams=streams, **settings):
        for j, i in enumerate(positions):
            values[i] = {c: columns[c][j].item() for c in VALUES}
    for i, row in enumerate(rows):
        answers = {"chosen": row["chosen_ids"], "rejected": row["rejected_ids"]}
        shared = np.array([min(len(a) for a in answers.values())], np.int32)  # LD-DPO: the shorter answer
        for name, answer in answers.items():
            ids = row["prompt_ids"] + answer
            input_ids = np.zeros((1, sequence_width(len(ids))), np.int32)
            input_ids[0, : len(ids)] = ids
            mask = np.zeros_like(input_ids)
            mask[0, len(row["prompt_ids"]) : len(ids)] = 1
            alone = batch_logps(model, input_ids, mask, shared, streams=[None])
            got = [values[i][f"ref_{name}_logps"], values[i][f"n_{name}_tokens"], values[i][f"ref_{name}_tail_logps"]]
            assert got == [a[0].item() for a in alone], (i, name)
