"""Breaks of issue 14's recent changes (reviewer break14): each test states a behaviour the README
claims and fails on the code as it is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

import tiny_models

SRC = Path(__file__).resolve().parents[2] / "src"
VALUES = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps",
          "n_chosen_tokens", "n_rejected_tokens")


def cached(out) -> dict:
    table = pq.read_table(sorted(Path(out).glob("*/part-*.parquet")))
    return {json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]): {c: r[c] for c in VALUES}
            for r in table.to_pylist()}


def precompute_subprocess(env_extra, *args):
    env = {**os.environ, "PYTHONPATH": str(SRC), **env_extra}
    result = subprocess.run([sys.executable, "-m", "mlx_dpo", "precompute", *map(str, args)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_values_do_not_depend_on_batchmates_with_the_wheels_blas(tiny_model_dir, tmp_path):
    """README (Precompute on both cores): a sequence's values are a function of its own tokens, bit for
    bit, whatever the other rows and --tokens-per-batch. With MLX_DPO_OPENBLAS=0 (a documented switch)."""
    standard = tiny_models.standard_rows()
    others = [{"prompt": r["prompt"] + " " + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
              for r in standard]
    caches = {}
    for name, rows, extra in (("alone", standard, ["--tokens-per-batch", 1]),
                              ("together", others + standard, ["--tokens-per-batch", 100000])):
        data = tiny_models.write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / name / "cache"
        precompute_subprocess({"MLX_DPO_OPENBLAS": "0"}, "--model", tiny_model_dir, "--data", data, "--out", out,
                              "--max-length", 64, "--no-reuse", *extra)
        caches[name] = cached(out)
    differ = [k for k, v in caches["alone"].items() if caches["together"][k] != v]
    assert not differ, f"{len(differ)} of {len(caches['alone'])} rows differ"


from test_remote import BUCKET, endpoint, s3  # noqa: E402,F401  (moto's S3 stand-in, as test_remote uses)


def test_overwrite_in_place_on_s3_reuses_the_old_cache(s3, tiny_model_dir, standard_data, tmp_path):  # noqa: F811
    """README (reuse): 'Rebuilding in place (--out SAME --overwrite) reads and verifies the old cache at
    --out as a source too, so only the new rows run through the model'. With --out s3://... ."""
    url = f"s3://{BUCKET}/caches/break14-overwrite"
    first = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", url,
                                   "--rows-per-shard", 8)
    assert first.exit_code == 0, first.output
    new = [{"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."}]
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + new)
    again = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", url,
                                   "--rows-per-shard", 8, "--overwrite")
    assert again.exit_code == 0, again.output
    assert f"train: 13 rows: 12 reused from {url}, 1 computed" in again.output, again.output
