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


def _poison(cache, column: str, value: float, shard_number: int = 1) -> tuple[str, int]:
    """Set `column` of the first row of train shard `shard_number` to `value`, keeping the manifest's sizes
    and sums right so only `cache verify`'s value check would see it; returns (shard path, row index)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][shard_number]
    path = cache / shard["path"]
    table = pq.read_table(path)
    position = table.schema.get_field_index(column)
    values = table.column(position).to_numpy().copy()
    values[0] = value
    table = table.set_column(position, table.schema.field(position), [values.astype(np.float32)])
    pq.write_table(table, path)
    shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return shard["path"], table["index"][0].as_py()


@pytest.mark.parametrize("column, value", [("ref_chosen_logps", float("-inf")), ("ref_chosen_logps", float("nan")),
                                           ("ref_rejected_logps", float("inf"))])
def test_a_non_finite_cached_value_is_an_error_naming_file_row_and_column(standard_cache, tiny_model_dir, tmp_path,
                                                                           column, value):
    """A -inf reference value once gave a finite loss, an applied step with an inf reward, and then
    `Error: ValueError: Unknown format code 'f' for object of type 'str'`. Now the stream stops at the
    row group holding it: one line naming the shard file, row, index and column, and `cache verify`."""
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    shard, index = _poison(cache, column, value)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", cache, "--model", tiny_model_dir, "--output", out, "--iters", 6, "--batch-size", 2,
        "--steps-per-report", 1]])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert f"{shard}: row 0 (index {index}): {column} is {value}, not finite" in line, line
    assert f"mlx-dpo cache verify {cache}" in line
    if (out / "metrics.jsonl").exists():  # steps before the damaged row group may have run; none after it
        assert all(np.isfinite(json.loads(x)["loss"]) for x in open(out / "metrics.jsonl"))


def _tiny_training(tiny_model_dir, cache, bad_index: int, iters: int, skips: list, mixture: bool = False):
    """train() itself on the tiny model (full fine-tune) over `cache`, the row `bad_index` given a -inf
    reference value after it left the stream (as a fault between stream and step would): returns the
    parameters after each step. With `mixture`, over two caches (`cache` twice), the row damaged in the
    second only."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.stream import PairStream
    from mlx_dpo.trainer.train import make_loss_fn, train

    model, tokenizer = load(str(tiny_model_dir))
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = [cache / s["path"] for s in manifest["splits"]["train"]["shards"]]
    stream = PairStream([shards, shards] if mixture else shards, batch_size=2,
                        max_length=22, truncation_mode="keep_start", pad_id=tokenizer.pad_token_id or 0, seed=0)

    def batches():
        for _, step in stream.forever():
            for batch in step:
                batch.ref_chosen_logps[np.isin(batch.indices, bad_index) & (batch.caches == 1 if mixture else True)] = -np.inf
            yield step

    cfg = TrainConfig(cache=str(cache), model=str(tiny_model_dir), output="unused")
    snapshots = [dict(tree_flatten(model.trainable_parameters()))]
    train(model, optim.AdamW(learning_rate=1e-2), batches(), make_loss_fn(cfg.loss_options()), iters=iters,
          on_skip=lambda step, info: skips.append((step, info)),
          on_save=lambda step, cache_pairs: snapshots.append({k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}),
          steps_per_save=1)
    return snapshots


def test_a_step_with_a_non_finite_metric_is_not_applied(standard_cache, tiny_model_dir):
    """A -inf reference value: the pair's sigmoid loss is 0 and finite, its gradient finite, but its
    reward is inf. The step is skipped, named with its rows and the non-finite metrics, and leaves
    the weights as they were; the other steps train."""
    bad = 0
    skips = []
    snapshots = _tiny_training(tiny_model_dir, standard_cache, bad, 6, skips)
    assert [step for step, _ in skips] and all(bad in info["indices"] for _, info in skips)
    assert all(np.isfinite(info["loss"]) and "rewards/chosen" in info["non_finite"] for _, info in skips)
    for step in range(1, 7):
        same = all(mx.array_equal(snapshots[step - 1][k], snapshots[step][k]).item() for k in snapshots[step])
        assert same == (step in [s for s, _ in skips]), step


def test_a_skipped_step_of_a_mixture_names_each_rows_cache(standard_cache, tiny_model_dir):
    """Two caches holding the same rows, index 0 damaged in the second only: a whole epoch's steps run,
    and each skipped step names its rows' caches beside their indices, the damaged row as cache 1."""
    skips = []
    _tiny_training(tiny_model_dir, standard_cache, 0, 12, skips, mixture=True)
    assert skips and all(len(info["caches"]) == len(info["indices"]) for _, info in skips)
    assert all((1, 0) in zip(info["caches"], info["indices"]) for _, info in skips)


def test_non_finite_steps_in_a_row_stop_the_run(standard_cache, tiny_model_dir):
    """Every row's reference value -inf: three skipped steps in a row end the run with one line."""
    from mlx_dpo.errors import UserError

    manifest = json.loads((standard_cache / "manifest.json").read_text())
    indices = {i for s in manifest["splits"]["train"]["shards"] for i in pq.read_table(standard_cache / s["path"])["index"].to_pylist()}
    with pytest.raises(UserError, match="^step 3: 3 steps in a row with a non-finite loss, gradient or metric"):
        _tiny_training(tiny_model_dir, standard_cache, list(indices), 6, [])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
def test_format_report_prints_non_finite_values(value):
    """metrics.jsonl stores a non-finite value as text ("inf"); the log line once died on it with
    `Unknown format code 'f' for object of type 'str'`."""
    from mlx_dpo.trainer.metrics import format_report

    record = {"step": 3, "split": "train", "loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": value,
              "rewards/chosen": value, "rewards/rejected": -0.1, "tokens_per_sec": value, "learning_rate": 1e-5}
    line = format_report(record)
    assert f"margin {float(value)}" in line and f"chosen {float(value)}" in line and "loss 0.5000" in line
