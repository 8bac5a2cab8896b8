"""`mlx-dpo cache ls` and `cache inspect`: on hand-made caches with known numbers, and on a real precompute."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli
from mlx_dpo.schemas import SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo, write_json_atomic

TOKENS = pa.list_(pa.int32())
# The columns inspect reads, as precompute writes them for one rejected answer per prompt.
SCHEMA = pa.schema([("index", pa.int64()), ("prompt_ids", TOKENS), ("chosen_ids", TOKENS), ("rejected_ids", TOKENS),
                    ("ref_chosen_logps", pa.float32()), ("ref_rejected_logps", pa.float32()),
                    ("n_chosen_tokens", pa.int32()), ("n_rejected_tokens", pa.int32())])
# With K rejected answers per prompt, the rejected columns hold K values per row.
SEVERAL_REJECTED = {"rejected_ids": pa.list_(TOKENS), "ref_rejected_logps": pa.list_(pa.float32()),
                    "n_rejected_tokens": pa.list_(pa.int32())}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_cache(root: Path, identity: str = "ab" * 32, rejected=None, schema=SCHEMA) -> Path:
    """A cache by hand: 4 train rows with prompt lengths 1..4, chosen 2, rejected 3 tokens, and reference
    log-probs chosen -1,-2,-3,-4 / rejected -2,-2,-2,-2 (so the reference prefers chosen in 1 of 4 pairs, 25%)."""
    root.mkdir(parents=True)
    columns = {
        "index": [0, 2, 3, 5],
        "prompt_ids": [[7] * n for n in (1, 2, 3, 4)],
        "chosen_ids": [[8, 2]] * 4,
        "rejected_ids": rejected["ids"] if rejected else [[9, 9, 2]] * 4,
        "ref_chosen_logps": [-1.0, -2.0, -3.0, -4.0],
        "ref_rejected_logps": rejected["logps"] if rejected else [-2.0] * 4,
        "n_chosen_tokens": [2] * 4,
        "n_rejected_tokens": rejected["n"] if rejected else [3] * 4,
    }
    part = root / "train" / "part-00000.parquet"
    part.parent.mkdir()
    pq.write_table(pa.table(columns, schema=schema), part)
    rejects = [{"split": "train", "index": i, "reason": "prompt fills max_length (9 >= 6)"} for i in (1, 4)]
    (root / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    split = SplitInfo(rows_in=6, rows_cached=4, rows_rejected=2, rejected_by_reason={"prompt fills max_length": 2},
                      completion_tokens=20, shards=[ShardInfo("train/part-00000.parquet", 4, part.stat().st_size, "-")])
    manifest = Manifest(schema_version=SCHEMA_VERSION, identity=identity, identity_fields=tiny_models.identity_fields(),
                        reference_model="some/model", max_length=6, truncation_mode="keep_start",
                        splits={"train": split}, rejects_file="rejects.jsonl", created_at="2025-01-02T03:04:05+00:00")
    write_json_atomic(root / "manifest.json", manifest.to_json())
    return root


def table_row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.strip().startswith(label))
    return line.strip()[len(label):].split()


def test_inspect_shows_identity_schema_lengths_logps_and_rejects(tmp_path):
    result = invoke("cache", "inspect", make_cache(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "identity           abababababab" in out and "reference model    some/model" in out
    assert table_row(out, "prompt_ids") == ["list<int32>"] and table_row(out, "ref_chosen_logps") == ["float"]
    assert table_row(out, "train") == ["6", "4", "2", "20"]  # input, cached, rejected, completion tokens
    # min p5 p50 p95 max of prompt lengths 1..4 (numpy's linear percentiles: p5 = 1.15, p50 = 2.5)
    assert table_row(out, "train prompt tokens") == ["1", "1", "2", "4", "4"]
    assert table_row(out, "train longest sequence tokens") == ["4", "4", "6", "7", "7"]  # prompt + 3
    assert "train: 1 of 4 pairs are longer than max_length 6" in out
    assert table_row(out, "train ref_chosen_logps")[:6] == ["-4.00", "-3.85", "-2.50", "-1.15", "-1.00", "-2.50"]
    assert table_row(out, "train ref chosen - rejected")[:5] == ["-2.00", "-1.85", "-0.50", "0.85", "1.00"]
    assert "reference already prefers chosen in 25.0% of pairs" in out
    assert table_row(out, "train  prompt fills max_length") == ["2", "1,", "4"]  # rows, first input rows


def test_inspect_reads_several_rejected_per_prompt(tmp_path):
    """K-rejected caches hold list columns; lengths and margins are per (chosen, rejected_k) pair."""
    schema = pa.schema([(f.name, SEVERAL_REJECTED.get(f.name, f.type)) for f in SCHEMA])
    rejected = {"ids": [[[9, 2], [9, 9, 9, 9, 2]]] * 4, "logps": [[-0.5, -5.0]] * 4, "n": [[2, 5]] * 4}
    result = invoke("cache", "inspect", make_cache(tmp_path / "k", rejected=rejected, schema=schema))
    assert result.exit_code == 0, result.output
    assert table_row(result.output, "train rejected tokens") == ["2", "2", "4", "5", "5"]  # 2,5 x4: p50 3.5
    assert table_row(result.output, "train longest sequence tokens") == ["6", "6", "8", "9", "9"]  # 1..4 + 5
    assert "prefers chosen in 50.0% of pairs" in result.output  # every chosen beats -5.0, none beats -0.5


def test_ls_lists_complete_and_incomplete_caches(tmp_path):
    make_cache(tmp_path / "caches" / "a", identity="12" * 32)
    make_cache(tmp_path / "caches" / "deeper" / "b", identity="34" * 32)
    partial = make_cache(tmp_path / "caches" / "partial")
    (partial / "manifest.json").unlink()
    result = invoke("cache", "ls", tmp_path / "caches")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["CACHE", "IDENTITY", "REFERENCE"]
    assert table_row(result.output, str(tmp_path / "caches" / "a"))[:6] == ["121212121212", "some/model", "6", "4",
                                                                           "-", "2"]
    assert str(tmp_path / "caches" / "deeper" / "b") in result.output
    assert " ".join(table_row(result.output, str(partial))).startswith("incomplete: shards but no manifest")
    assert len(lines) == 4


def test_ls_of_a_folder_without_caches_says_so(tmp_path):
    result = invoke("cache", "ls", tmp_path)
    assert result.exit_code == 0 and result.output.startswith(f"No mlx-dpo caches under {tmp_path}")


def test_inspect_of_a_folder_that_is_not_a_cache_is_one_line(tmp_path):
    result = invoke("cache", "inspect", tmp_path)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path}: not a complete mlx-dpo cache (no manifest.json; run `mlx-dpo precompute`)"


@pytest.fixture(scope="module")
def real_cache(tiny_model_dir, standard_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "cache"
    args = ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out, "--max-length", 22]
    assert invoke(*args).exit_code == 0
    return out


def test_inspect_and_ls_read_what_precompute_writes(real_cache):
    manifest = json.loads((real_cache / "manifest.json").read_text())
    result = invoke("cache", "inspect", real_cache)
    assert result.exit_code == 0, result.output
    rows = manifest["splits"]["train"]
    assert table_row(result.output, "train")[:3] == [f"{rows['rows_in']:,}", f"{rows['rows_cached']:,}",
                                                     f"{rows['rows_rejected']:,}"]
    for reason, n in rows["rejected_by_reason"].items():
        assert table_row(result.output, f"train  {reason}")[0] == f"{n:,}"
    listing = invoke("cache", "ls", real_cache.parent)
    assert table_row(listing.output, str(real_cache))[0] == manifest["identity"][:12]
