"""One cache, many experiments: every loss trains end to end from the same cache, untouched."""

import json
import math
import shutil

import pytest

import tiny_models
from mlx_dpo.trainer.config import LOSS_TYPES

run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    tiny_models.write_jsonl(root / "data.jsonl", tiny_models.standard_rows())
    result = run("precompute", "--model", tiny_model_dir, "--data", root / "data.jsonl", "--out", root / "cache")
    assert result.exit_code == 0, result.output
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()}
    yield root, stamps
    # Nothing any run did touched the cache.
    assert {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()} == stamps


@pytest.mark.parametrize("extra", [["--loss-type", t, *(["--label-smoothing", "0.001"] if t == "exo_pair" else [])]
                                   for t in LOSS_TYPES] + [
    ["--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"],
    ["--rpo-alpha", "1.0"],
    ["--reference-free"],
    ["--f-divergence-type", "js_divergence"],
    ["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.5"],
    ["--loss-type", "robust", "--label-smoothing", "0.2"],
    ["--ld-alpha", "0.5"],
], ids=lambda extra: "-".join(a.strip("-") for a in extra))
def test_trains_from_the_shared_cache(shared, tiny_model_dir, extra):
    root, _ = shared
    out = root / ("run-" + "-".join(a.strip("-").replace(",", "+") for a in extra))
    result = run("train", "--cache", root / "cache", "--model", tiny_model_dir, "--output", out,
                 "--iters", 2, "--batch-size", 4, "--steps-per-report", 1, "--learning-rate", 1e-3, *extra)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert "reference from cache" in result.output
    shutil.rmtree(out)


def test_step0_is_ln2_with_and_without_ld_but_not_reference_free(shared, tiny_model_dir):
    root, _ = shared
    losses = {}
    for name, extra in (("dpo", []), ("ld", ["--ld-alpha", "0.3"]), ("free", ["--reference-free"])):
        out = root / f"step0-{name}"
        assert run("train", "--cache", root / "cache", "--model", tiny_model_dir, "--output", out,
                   "--iters", 1, "--batch-size", 4, *extra).exit_code == 0
        losses[name] = json.loads(open(out / "metrics.jsonl").readline())["loss"]
    assert losses["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["ld"] == pytest.approx(math.log(2), abs=1e-4)  # policy LD sums equal the cached reference's
    assert abs(losses["free"] - math.log(2)) > 1e-3  # the raw log-prob gap is not zero


def test_ld_alpha_weights_only_the_preference_term(shared, tiny_model_dir):
    """With --ld-alpha the NLL (`nll_loss`, `sft`, --rpo-alpha) stays the plain per-token NLL of the whole
    chosen answer: at step 1 (same pairs, same policy) it equals the run without LD-DPO, at any α."""
    root, _ = shared
    first = {}
    for name, extra in (("plain", []), ("ld0", ["--ld-alpha", "0"]), ("ld5", ["--ld-alpha", "0.5"])):
        out = root / f"ld-nll-{name}"
        assert run("train", "--cache", root / "cache", "--model", tiny_model_dir, "--output", out, "--iters", 1,
                   "--batch-size", 4, "--loss-type", "sigmoid,sft", "--loss-weights", "0,1", *extra).exit_code == 0
        first[name] = json.loads(open(out / "metrics.jsonl").readline())
    for name in ("ld0", "ld5"):
        assert first[name]["nll_loss"] == pytest.approx(first["plain"]["nll_loss"], rel=1e-6)
        assert first[name]["loss"] == pytest.approx(first["plain"]["loss"], rel=1e-6)  # sft only (weight 0 on sigmoid)
    assert first["plain"]["loss"] == pytest.approx(first["plain"]["nll_loss"], rel=1e-6)
