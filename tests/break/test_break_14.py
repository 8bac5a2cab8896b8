"""Breaks of issue 14's recent changes (reviewer break14): each test states a behaviour the README
claims and fails on the code as it is."""

import json

import tiny_models
from test_remote import BUCKET, endpoint, s3  # noqa: F401  (moto's S3 stand-in, as test_remote uses)


def test_overwrite_in_place_on_s3_reuses_the_old_cache(s3, tiny_model_dir, standard_data, tmp_path):  # noqa: F811
    """README (reuse): 'Rebuilding in place (--out SAME --overwrite) reads and verifies the old cache at
    --out as a source too, so only the new rows run through the model'. With --out s3://... ."""
    url = f"s3://{BUCKET}/caches/break14-overwrite"
    first = tiny_models.invoke_cli(
        "precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", url, "--rows-per-shard", 8
    )
    assert first.exit_code == 0, first.output
    new = [{"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."}]
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + new)
    again = tiny_models.invoke_cli(
        "precompute",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        url,
        "--rows-per-shard",
        8,
        "--overwrite",
    )
    assert again.exit_code == 0, again.output
    assert f"train: 13 rows: 12 reused from {url}, 1 computed" in again.output, again.output


def long_rows(count: int) -> list[dict]:
    """Rows of 100-400 words per answer (sequences of 300-800 tokens of the tiny model)."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to red blue sky sun moon star tree".split()
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        chosen, rejected = (
            " " + " ".join(rng.choice(words) for _ in range(rng.randint(100, 400))) for _ in range(2)
        )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def test_step1_loss_is_ln2_on_a_long_single_row_file(tiny_model_dir, tmp_path):
    """README: step 1 is scored when the policy still equals the reference, its loss ln 2 (within 1e-5,
    tests/trainer/test_train.py). A one-row file whose answers are a few hundred tokens, default beta."""
    import math

    data = tiny_models.write_jsonl(tmp_path / "one.jsonl", [long_rows(2)[1]])
    tiny_models.run_cli(
        "precompute",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "cache",
        "--max-length",
        1024,
    )
    tiny_models.run_cli(
        "train",
        "--cache",
        tmp_path / "cache",
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "run",
        "--iters",
        1,
        "--batch-size",
        1,
        "--steps-per-report",
        1,
        "--steps-per-eval",
        1000,
        "--steps-per-save",
        1000,
    )
    first = [
        json.loads(line)
        for line in open(tmp_path / "run" / "metrics.jsonl")
        if json.loads(line).get("split") == "train"
    ][0]
    assert abs(first["loss"] - math.log(2)) <= 1e-5, first


def test_a_swap_cut_short_in_s3_staging_does_not_hide_the_remote_cache(
    s3,  # noqa: F811
    tiny_model_dir,
    standard_data,
    tmp_path,
):
    """README (--overwrite): killed during the swap, the next precompute finishes it; before the upload
    the bucket still holds the old cache, whole. A `precompute --out s3://... --overwrite` killed right after
    its swap record was written (the state test_overwrite's _cut_swap builds, in the staging directory),
    then the old command again: the bucket's cache has its identity, so it should be reused."""
    import shutil

    from mlx_dpo.pipeline import remote

    url = f"s3://{BUCKET}/caches/break14-cut"
    old = ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", url, "--max-length", 40]
    first = tiny_models.invoke_cli(*old)
    assert first.exit_code == 0, first.output
    new = tmp_path / "new"  # the rebuild's complete cache (other --max-length)
    built = tiny_models.invoke_cli(
        "precompute",
        "--model",
        tiny_model_dir,
        "--data",
        standard_data,
        "--out",
        new,
        "--max-length",
        24,
        "--no-reuse",
    )
    assert built.exit_code == 0, built.output
    work = remote.staging_dir(url) / ".mlx-dpo-rebuild"
    shutil.copytree(new, work, ignore=shutil.ignore_patterns(".*"))
    files = sorted(
        p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    (work / "swap.json").write_text(json.dumps({"files": files + ["manifest.json"]}))
    again = tiny_models.invoke_cli(*old)
    assert again.exit_code == 0, again.output


def test_overwrite_repairs_a_cache_whose_shard_became_a_folder(tiny_model_dir, standard_data, tmp_path):
    """README: --overwrite 'rebuilds ... (the repair `cache verify` recommends)', and readers name 'a shard
    that is a folder'. A cache whose train/part-00000.parquet is a folder: the rebuild crashes in its swap
    (IsADirectoryError) after removing the old manifest, and every later precompute of the folder hits the
    same swap first, so no command repairs it."""
    cache = tmp_path / "cache"
    args = [
        "precompute",
        "--model",
        tiny_model_dir,
        "--data",
        standard_data,
        "--out",
        cache,
        "--max-length",
        40,
        "--rows-per-shard",
        4,
    ]
    tiny_models.run_cli(*args)
    shard = sorted((cache / "train").glob("part-*.parquet"))[0]
    shard.unlink()
    shard.mkdir()
    (shard / "stray").write_text("x")
    result = tiny_models.invoke_cli(*args, "--overwrite", catch_exceptions=True)
    assert result.exit_code == 0, (result.output, repr(result.exception))
    verify = tiny_models.invoke_cli("cache", "verify", cache)
    assert verify.exit_code == 0, verify.output
