"""train names a policy that is not the cache's reference as computed (other weights, another
compute dtype), and its checkpoints are durable (issue 10, items 1, 8, 9)."""

import json
import math
import shutil

import pytest

import tiny_models
from conftest import atomic_temp_name

NOTE = "Note: policy "


run = tiny_models.invoke_cli


def train(cache, model, out, *extra):
    return run("train", "--cache", cache, "--model", model, "--output", out, "--iters", 1, "--batch-size", 4,
               "--steps-per-report", 1, "--steps-per-eval", 100, *extra)


def first_loss(out):
    return next(json.loads(line) for line in open(out / "metrics.jsonl") if '"train"' in line)["loss"]


def test_the_reference_itself_gets_no_note(standard_cache, tiny_model_dir, tmp_path):
    result = train(standard_cache, tiny_model_dir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert NOTE not in result.output


def test_a_policy_with_other_weights_is_named(standard_cache, tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    tiny_models.build_llama(other, tokenizer_dir=tiny_model_dir, seed=1)  # same tokenizer, other weights
    result = train(standard_cache, other, tmp_path / "run")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith(NOTE)]
    assert len(notes) == 1 and "its weights (" in notes[0] and "are not the cache's reference" in notes[0]
    assert "not exactly ln 2" in notes[0]


@pytest.fixture(scope="module")
def bf16_cache(tiny_model_dir, standard_data, tmp_path_factory):
    """A bfloat16 checkpoint and its cache computed in bfloat16 (as on a GPU by default)."""
    import mlx.core as mx

    root = tmp_path_factory.mktemp("bf16")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = mx.load(str(model / "model.safetensors"))
    mx.save_safetensors(str(model / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    result = run("precompute", "--model", model, "--data", standard_data, "--out", root / "cache", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    return model, root / "cache"


def test_a_policy_computing_in_another_dtype_is_named(bf16_cache, tmp_path):
    model, cache = bf16_cache
    # the policy computes in float32 on CPU; one batch of every pair, so the check does not rest on which
    # 4 pairs the seeded order puts first (one such batch was within 4e-6 of ln 2)
    result = train(cache, model, tmp_path / "run", "--batch-size", 16)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith(NOTE)]
    assert len(notes) == 1 and "it computes in float32, the cache's reference was computed in bfloat16" in notes[0]
    assert "weights" not in notes[0]  # same weights: only the precision differs
    assert abs(first_loss(tmp_path / "run") - math.log(2)) > 1e-4  # why it is worth a line


def test_checkpoints_are_fsynced_files_and_folders(standard_cache, tiny_model_dir, tmp_path, fsynced):
    out = tmp_path / "run"
    assert train(standard_cache, tiny_model_dir, out, "--steps-per-save", 1).exit_code == 0
    checkpoint = out / "checkpoints" / "0000001"
    in_temp_folder = {p.rsplit("/", 1)[-1] for p in fsynced if "/checkpoints/.0000001." in p}
    assert in_temp_folder == {p.name for p in checkpoint.iterdir()} | {atomic_temp_name(checkpoint)}
    assert {str(out / "checkpoints"), str(out)} <= set(fsynced)  # the rename, and the new folder
    names = {p.rsplit("/", 1)[-1] for p in fsynced}
    written = [p for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"]  # adapters, configs
    assert written and all(atomic_temp_name(p) in names for p in written), (written, names)
