"""Our cached reference log-probs equal TRL's `DPOTrainer(precompute_ref_log_probs=True)` on the same model and data.

What TRL (1.16, trl/trainer/dpo_trainer.py) does that this test depends on:

* `_prepare_dataset`: plain-text `chosen`/`rejected` get `tokenizer.eos_token` appended unless they already end
  with it (conversational rows do not; the chat template ends assistant turns with eos).
* `tokenize_fn`: tokenizes the prompt alone and prompt+chosen, prompt+rejected, with `tokenizer(text)` for strings
  (the post-processor adds bos) or `apply_chat_template(..., add_generation_prompt=True for the prompt alone)`
  for message lists (add_special_tokens=False, so bos comes from the template). `prompt_ids` is the common prefix
  of the prompt with BOTH prompt+completion token lists (min of the two), so it can be shorter than the tokenized
  prompt when tokens merge across the boundary ("capital of Fra" + "nce"); `chosen_ids`/`rejected_ids` are the
  rest. These ids in `trainer.train_dataset` are untruncated.
* With `max_length` set and `truncation_mode="keep_start"`, rows with `len(prompt_ids) >= max_length` are
  filtered out of the dataset before the precompute (our tool reports them as rejected rows instead). Nothing is
  dropped under `keep_end`.
* `DataCollatorForPreference` truncates each prompt+completion sequence (and its completion mask) to
  `[:max_length]` (keep_start) or `[-max_length:]` (keep_end), then right-pads.
* `compute_ref_log_probs`: sum over positions t >= 1 of log p(token_t | tokens < t) where the completion mask is
  set (labels shifted by one: position 0 is never scored, which matters under keep_end when the window starts
  inside the completion).
* `DPOConfig` defaults `bf16=True` (CPU autocast to bfloat16) and `max_length=1024`: the test passes `bf16=False`
  so TRL runs in float32, and `max_length=None` for the untruncated cases.
"""

import json
import traceback
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny_models import read_jsonl

ATOL = 2e-3
SHARD_ROWS = 5
ROW = "_row_index"  # extra column that survives TRL's map/filter, to match TRL rows to input rows

# (data kind, max_length, truncation_mode). With the tiny tokenizer, max_length=22 keep_start drops a row whose
# prompt is exactly 22 tokens (TRL's filter is `len(prompt_ids) < max_length`), keep_end has a rejected completion
# longer than the window, and max_length=10 keeps a row with a single scored completion token.
# _check_trl_is_meaningful asserts the coverage that does not depend on exact token counts.
CASES = [
    pytest.param("standard", None, "keep_start", id="standard"),
    pytest.param("conversational", None, "keep_start", id="conversational"),
    pytest.param("standard", 22, "keep_start", id="standard-keep_start-22"),
    pytest.param("standard", 22, "keep_end", id="standard-keep_end-22"),
    pytest.param("standard", 10, "keep_start", id="standard-keep_start-10"),
    pytest.param("conversational", 24, "keep_start", id="conversational-keep_start-24"),
]


def run_trl(model_dir: Path, data_path: Path, max_length, truncation_mode, output_dir: Path, ld_alpha=None) -> dict[int, dict]:
    """TRL's precompute on the torch model; {input row index: ids, ref logps, tokens scored}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(data_path)
    dataset = Dataset.from_list([{**row, ROW: i} for i, row in enumerate(rows)])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # keep_end is deprecated in TRL (still supported)
        args = DPOConfig(
            output_dir=str(output_dir),
            precompute_ref_log_probs=True,
            per_device_train_batch_size=4,
            max_length=max_length,
            truncation_mode=truncation_mode,
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            save_strategy="no",
            ld_alpha=ld_alpha,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    out = {}
    for example in trainer.train_dataset:
        # Tokens TRL scores after its own truncation: the collator's completion mask, shifted like the labels.
        mask = trainer.data_collator([example])["completion_mask"][:, 1:].sum(dim=1).tolist()
        out[example[ROW]] = {
            "prompt_ids": list(example["prompt_ids"]),
            "chosen_ids": list(example["chosen_ids"]),
            "rejected_ids": list(example["rejected_ids"]),
            "ref_chosen_logps": float(example["ref_chosen_logps"]),
            "ref_rejected_logps": float(example["ref_rejected_logps"]),
            "n_chosen_tokens": int(mask[0]),
            "n_rejected_tokens": int(mask[1]),
        }
    return out


def run_ours(model_dir: Path, data_path: Path, max_length, truncation_mode, cache_dir: Path):
    """`mlx-dpo precompute` through its CLI; returns ({input row index: cache row}, manifest, shard schema)."""
    from click.testing import CliRunner

    from mlx_dpo.cli import cli

    argv = ["precompute", "--model", str(model_dir), "--data", str(data_path), "--out", str(cache_dir)]
    argv += ["--rows-per-shard", str(SHARD_ROWS)]  # several shards: indices must be global input rows
    if max_length is not None:
        argv += ["--max-length", str(max_length), "--truncation-mode", truncation_mode]
    result = CliRunner().invoke(cli, argv)
    if result.exit_code != 0:
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"mlx-dpo {' '.join(argv)} exited {result.exit_code}\n{result.output}\n{tb}")

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shards = sorted((cache_dir / "train").glob("part-*.parquet"))
    assert shards, f"no train/part-*.parquet in {cache_dir}: {sorted(p.name for p in cache_dir.rglob('*'))}"
    schema = pq.read_schema(shards[0])
    rows = [r for shard in shards for r in pq.read_table(shard).to_pylist()]
    by_index = {}
    for r in sorted(rows, key=lambda r: r["index"]):
        assert r["index"] not in by_index, f"row index {r['index']} cached twice"
        by_index[r["index"]] = r
    return by_index, manifest, schema, len(shards)


def _check_trl_is_meaningful(trl: dict[int, dict], n_rows: int, max_length, truncation_mode) -> None:
    """The comparison must be able to fail: TRL produced real values, and the case exercises what it claims."""
    assert trl, "TRL kept no rows"
    logps = [v for r in trl.values() for v in (r["ref_chosen_logps"], r["ref_rejected_logps"])]
    assert all(v < -1e-3 for v in logps), f"TRL ref logps should all be negative sums: {logps}"
    assert len({round(v, 3) for v in logps}) > len(logps) // 2, f"TRL ref logps look degenerate: {logps}"
    if max_length is None:
        assert len(trl) == n_rows
        return
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trl.values()]
    assert any(n > max_length for n in lengths), "no kept row is long enough to be truncated"
    if truncation_mode == "keep_start":
        assert len(trl) < n_rows, "keep_start case drops no row: it does not test TRL's filter"
    else:
        assert len(trl) == n_rows
        assert any(
            max(len(r["chosen_ids"]), len(r["rejected_ids"])) >= max_length for r in trl.values()
        ), "keep_end case has no completion filling the whole window (position 0 inside the completion)"


@pytest.mark.parametrize("kind, max_length, truncation_mode", CASES)
def test_reference_logps_match_trl(
    kind, max_length, truncation_mode, tiny_model_dir, standard_data, conversational_data, tmp_path
):
    data_path = {"standard": standard_data, "conversational": conversational_data}[kind]
    n_rows = len(read_jsonl(data_path))

    trl = run_trl(tiny_model_dir, data_path, max_length, truncation_mode, tmp_path / "trl")
    _check_trl_is_meaningful(trl, n_rows, max_length, truncation_mode)

    ours, manifest, schema, n_shards = run_ours(tiny_model_dir, data_path, max_length, truncation_mode, tmp_path / "cache")

    # Column types of the cache contract.
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert schema.field(name).type == pa.list_(pa.int32()), f"{name}: {schema.field(name).type}"
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        assert schema.field(name).type == pa.float32(), f"{name}: {schema.field(name).type}"

    # Same rows: TRL's filtered-out rows are exactly the ones our tool rejects.
    dropped_by_trl = sorted(set(range(n_rows)) - set(trl))
    missing = sorted(set(trl) - set(ours))
    extra = sorted(set(ours) - set(trl))
    print(f"\n[{kind} max_length={max_length} {truncation_mode}] TRL kept {len(trl)}/{n_rows}, dropped {dropped_by_trl}")
    assert not missing and not extra, (
        f"rows differ from TRL's: ours lacks {missing}, ours has extra {extra} (TRL dropped {dropped_by_trl})"
    )
    split = manifest.get("splits", {}).get("train", {})
    if "rows_rejected" in split:
        assert split["rows_rejected"] == len(dropped_by_trl), f"manifest train split: {split}"
    if "rows_cached" in split:
        assert split["rows_cached"] == len(trl), f"manifest train split: {split}"
    if manifest.get("rejects_file"):  # each reject is reported as {"split", "index", "reason"}
        rejects = read_jsonl(tmp_path / "cache" / manifest["rejects_file"])
        reported = sorted(r["index"] for r in rejects if r.get("split", "train") == "train")
        assert reported == dropped_by_trl, f"rejects reported {rejects}, TRL dropped {dropped_by_trl}"

    problems = []
    max_diff = 0.0
    for i in sorted(trl):
        expected, got = trl[i], ours[i]
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(got[name]) != expected[name]:
                problems.append(f"row {i} {name}: ours {list(got[name])} != TRL {expected[name]}")
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            diff = abs(got[name] - expected[name])
            max_diff = max(max_diff, diff)
            if not diff <= ATOL:
                problems.append(f"row {i} {name}: ours {got[name]:.5f} TRL {expected[name]:.5f} (|diff| {diff:.2e})")
        for name in ("n_chosen_tokens", "n_rejected_tokens"):
            if got[name] != expected[name]:
                problems.append(f"row {i} {name}: ours {got[name]} != TRL's scored tokens {expected[name]}")
    print(f"max |ours - TRL| ref logps: {max_diff:.3e} over {len(trl)} rows ({n_shards} shards)")
    assert not problems, "differences from TRL:\n" + "\n".join(problems)


def test_ld_dpo_reference_matches_trl(tiny_model_dir, standard_data, tmp_path):
    """TRL's LD-DPO reference value is shared + α·tail; ours is the cached sum - (1 - α)·tail."""
    alpha = 0.3
    trl = run_trl(tiny_model_dir, standard_data, None, "keep_start", tmp_path / "trl", ld_alpha=alpha)
    ours, *_ = run_ours(tiny_model_dir, standard_data, None, "keep_start", tmp_path / "ours")
    differing = 0
    for index, row in trl.items():
        for side in ("chosen", "rejected"):
            mine = ours[index][f"ref_{side}_logps"] - (1 - alpha) * ours[index][f"ref_{side}_tail_logps"]
            assert mine == pytest.approx(row[f"ref_{side}_logps"], abs=2e-3), (index, side)
            differing += abs(ours[index][f"ref_{side}_tail_logps"]) > 1e-3
    assert differing >= 5  # the data has answers of different lengths, so tails are not all zero
