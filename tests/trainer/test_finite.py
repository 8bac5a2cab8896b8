"""No loss is NaN or inf for log-ratios anywhere in ±1000 nats, and a non-finite step is never applied."""

import hashlib
import itertools
import json
import shutil

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlx_dpo import preference_loss
from mlx_dpo.cli import cli
from mlx_dpo.losses import LOSSES
from mlx_dpo.trainer.config import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LABEL_SMOOTHING_LOSSES

RATIOS = [-1000.0, -300.0, -100.0, -45.0, -40.0, -20.0, -1.0, 0.0, 1.0, 20.0, 40.0, 45.0, 100.0, 300.0, 1000.0]


def _cases():
    for name in sorted(LOSSES):
        divergences = F_DIVERGENCES if name in F_DIVERGENCE_LOSSES else ("reverse_kl",)
        smoothings = (0.0, 0.2) if name in LABEL_SMOOTHING_LOSSES else (0.0,)
        smoothings = (1e-3, 0.2) if name == "exo_pair" else smoothings  # ε = 0 is refused
        for divergence, eps in itertools.product(divergences, smoothings):
            coefs = (0.5, 2.0) if divergence == "alpha_divergence" else (0.5,)
            for coef in coefs:
                yield pytest.param(name, divergence, eps, coef, id=f"{name}-{divergence}-{coef}-eps{eps}")
    for divergence in F_DIVERGENCES:  # several rejected, Plackett-Luce
        yield pytest.param("softmax", divergence, 0.0, 0.5, id=f"softmax-{divergence}")


@pytest.mark.parametrize("name, divergence, eps, coef", list(_cases()))
def test_finite_loss_and_gradient_over_1000_nats(name, divergence, eps, coef):
    """Every pair of chosen/rejected log-ratios from RATIOS (the reference at -50, lengths 1 and 7)."""
    chosen, rejected = (mx.array(v) for v in zip(*itertools.product(RATIOS, RATIOS)))
    reference = mx.full(chosen.shape, -50.0)
    options = dict(beta=0.1, label_smoothing=eps, f_divergence_type=divergence, f_alpha_divergence_coef=coef,
                   chosen_lengths=mx.full(chosen.shape, 1.0), rejected_lengths=mx.full(chosen.shape, 7.0))
    if name == "softmax":
        rejected = mx.stack([rejected, chosen[::-1]], axis=1)  # K = 2
        options.update(rejected_aggregation="softmax", rejected_lengths=mx.full(rejected.shape, 7.0))
        name = "sigmoid"
    ref_rejected = mx.full(rejected.shape, -50.0)

    def total(policy_chosen, policy_rejected):
        return preference_loss(policy_chosen, policy_rejected, reference, ref_rejected, loss_type=name,
                               **options).sum()

    value, grads = mx.value_and_grad(total, argnums=(0, 1))(chosen + reference, rejected + ref_rejected)
    assert np.isfinite(value.item()), value
    for grad in grads:
        assert np.isfinite(np.array(grad)).all(), grad


def _poison(cache, rows: str):
    """Set ref_chosen_logps to NaN in the cache's train shards (`rows`: "one" row, or "all"), keeping
    the manifest's sizes and sums right so only the values are wrong."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for k, shard in enumerate(manifest["splits"]["train"]["shards"]):
        if rows == "one" and k != 1:
            continue
        path = cache / shard["path"]
        table = pq.read_table(path)
        column = table.schema.get_field_index("ref_chosen_logps")
        nan = pq.read_table(path).column(column).to_numpy() * np.nan
        table = table.set_column(column, table.schema.field(column), [nan.astype(np.float32)])
        pq.write_table(table, path)
        shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_non_finite_step_is_skipped_and_reported(standard_cache, tiny_model_dir, tmp_path):
    """One of the 6 cached rows has a NaN reference value: the steps holding it are skipped, named in the
    log and metrics.jsonl with their rows, and leave the weights as they were; the others train."""
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    bad = pq.read_table(cache / _poison(cache, "one")["splits"]["train"]["shards"][1]["path"])["index"][0].as_py()
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", cache, "--model", tiny_model_dir, "--output", out, "--iters", 6, "--batch-size", 2,
        "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-save", 1]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    skipped = [r for r in records if r["split"] == "skipped"]
    assert skipped and all(bad in r["indices"] and r["loss"] == "nan" for r in skipped)
    assert len(skipped) == 2  # the row is in one step of each of the 2 epochs (3 steps of 2 rows each)
    trained = [r for r in records if r["split"] == "train"]
    assert len(trained) == 4 and all(np.isfinite(r["loss"]) for r in trained)
    for record in skipped:
        step = record["step"]
        assert f"step {step:>5} | loss nan" in result.output
        before, after = (mx.load(str(out / f"{s:07d}_adapters.safetensors")) for s in (step - 1, step))
        if step > 1:
            assert all(mx.array_equal(before[k], after[k]).item() for k in after)


def test_non_finite_steps_in_a_row_stop_the_run(standard_cache, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    _poison(cache, "all")
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 6,
        "--batch-size", 2]])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: step 3: 3 steps in a row with a non-finite loss or gradient"), result.output
