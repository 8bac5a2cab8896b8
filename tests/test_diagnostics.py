"""Data diagnostics of `cache inspect` on hand-built caches whose answers are worked out in the docstrings."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli
from mlx_dpo.diagnostics import SplitDiagnostics, differing_tokens, readings, split_diagnostics
from mlx_dpo.schemas import SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo, write_json_atomic

TOKENS = pa.list_(pa.int32())


def write_split(root: Path, split: str, rows: list[dict]) -> SplitInfo:
    several = isinstance(rows[0]["rejected_ids"][0], list)
    schema = pa.schema([
        ("index", pa.int64()), ("prompt_ids", TOKENS), ("chosen_ids", TOKENS),
        ("rejected_ids", pa.list_(TOKENS) if several else TOKENS), ("ref_chosen_logps", pa.float32()),
        ("ref_rejected_logps", pa.list_(pa.float32()) if several else pa.float32()), ("n_chosen_tokens", pa.int32()),
        ("n_rejected_tokens", pa.list_(pa.int32()) if several else pa.int32())])
    columns = {name: [row[name] for row in rows] for name in schema.names if name in rows[0]}
    columns["n_chosen_tokens"] = [len(r["chosen_ids"]) for r in rows]
    columns["n_rejected_tokens"] = [[len(a) for a in r["rejected_ids"]] if several else len(r["rejected_ids"])
                                    for r in rows]
    part = root / split / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    # Row groups of 2 rows: the diagnostics must carry counts across row groups.
    pq.write_table(pa.table({"index": list(range(len(rows))), **columns}, schema=schema), part, row_group_size=2)
    return SplitInfo(rows_in=len(rows), rows_cached=len(rows), rows_rejected=0, rejected_by_reason={},
                     completion_tokens=0, shards=[ShardInfo(f"{split}/part-00000.parquet", len(rows),
                                                            part.stat().st_size, "-")])


def make_cache(root: Path, splits: dict[str, list[dict]]) -> Path:
    root.mkdir(parents=True)
    infos = {name: write_split(root, name, rows) for name, rows in splits.items()}
    manifest = Manifest(schema_version=SCHEMA_VERSION, identity="ab" * 32, identity_fields=tiny_models.identity_fields(),
                        reference_model="some/model", max_length=64, truncation_mode="keep_start", splits=infos,
                        rejects_file="rejects.jsonl", created_at="2025-01-02T03:04:05+00:00")
    write_json_atomic(root / "manifest.json", manifest.to_json())
    return root


def row(prompt, chosen, rejected, chosen_logp, rejected_logp):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "ref_chosen_logps": chosen_logp, "ref_rejected_logps": rejected_logp}


# chosen - rejected tokens: +3, 0, +1, +1, -3 -> longer in 3 of 5 (60%: a bias), shorter in 1, mean +0.4.
# Differing tokens: 4 (only the final 2 shared), 1 (10 _ 2), 3, 3, 4 -> 3 pairs differ in at most 3 tokens.
# Prompts: [1, 2] twice, [3] twice, [4] once; row 3 repeats row 2 exactly.
# Per token: chosen -10/5, -3/3, -4/4, -4/4, -2/2 = mean -1.2; rejected -2/2, -6/3, -6/3, -6/3, -10/5 = mean -1.8;
# chosen higher in 4 of 5 (all but row 0).
TRAIN = [
    row([1, 2], [10, 11, 12, 13, 2], [20, 2], -10.0, -2.0),
    row([1, 2], [10, 11, 2], [10, 12, 2], -3.0, -6.0),
    row([3], [30, 31, 32, 2], [40, 41, 2], -4.0, -6.0),
    row([3], [30, 31, 32, 2], [40, 41, 2], -4.0, -6.0),
    row([4], [5, 2], [6, 7, 8, 9, 2], -2.0, -10.0),
]
# Valid: the prompt [3] is also in train (1 row); chosen longer in 1 of 2, never shorter.
VALID = [row([3], [7, 7, 2], [8, 2], -3.0, -2.0), row([9], [7, 2], [8, 2], -2.0, -2.0)]


def test_differing_tokens():
    assert differing_tokens([5, 6, 7, 8], [5, 9, 8]) == 2  # 6 7 against 9
    assert differing_tokens([5, 6], [5, 6, 7]) == 1
    assert differing_tokens([1, 2, 3], [4, 5, 6]) == 3
    assert differing_tokens([1, 1, 1], [1, 1]) == 1  # prefix and suffix never count a token twice
    assert differing_tokens([], [7]) == 1


def test_numbers_on_a_hand_built_split(tmp_path):
    cache = make_cache(tmp_path / "cache", {"train": TRAIN})
    d = split_diagnostics([cache / "train" / "part-00000.parquet"])
    assert (d.comparisons, d.chosen_longer, d.chosen_shorter) == (5, 3, 1)
    assert d.length_difference == pytest.approx(0.4)
    assert d.repeated_prompts == (2, 4, 2) and d.repeated_pairs == 1
    assert d.few_token_pairs == 3
    assert (d.chosen_per_token, d.rejected_per_token) == (pytest.approx(-1.2), pytest.approx(-1.8))
    assert d.chosen_per_token_higher == 4


def test_cache_inspect_prints_each_diagnostic_with_its_reading(tmp_path):
    cache = make_cache(tmp_path / "cache", {"train": TRAIN, "valid": VALID})
    result = CliRunner().invoke(cli, ["cache", "inspect", str(cache)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    section = lines[lines.index("Data diagnostics (over every chosen/rejected pair)") + 1:]
    assert section[:8] == [
        "  train length bias: chosen longer in 3 of 5 pairs (60.0%), shorter in 1 (20.0%); chosen - rejected "
        "+0.4 tokens on average",
        "    -> chosen answers are mostly longer: DPO can learn to write longer rather than better (watch answer "
        "lengths in `report --samples`; --ld-alpha weighs the extra tokens less)",
        "  train repeated prompts: 2 prompts occur more than once (4 rows, at most 2 times); 1 row repeating an "
        "earlier pair exactly",
        "    -> repeated pairs count several times in training and evaluation; deduplicate them unless intended",
        "  train small differences: 3 pairs (60.0%) whose answers differ in at most 3 tokens after their common "
        "start and end",
        "    -> the preference rests on a few tokens (a fact, a name, a number): check they are real corrections, "
        "not noise or formatting",
        "  train reference per token: chosen -1.200, rejected -1.800 nats/token on average; chosen higher in 4 "
        "pairs (80.0%)",
        "    -> the reference already favours the chosen answers' tokens: they are close to what it writes",
    ]
    valid = [line for line in section if line.startswith("  valid")]
    assert valid[0].startswith("  valid length bias: chosen longer in 1 of 2 pairs (50.0%), shorter in 0 (0.0%)")
    assert valid[1] == ("  valid repeated prompts: 0 prompts occur more than once (0 rows, at most 0 times); 0 rows "
                        "repeating an earlier pair exactly; 1 row with a prompt that is also in train")
    reading = section[section.index(valid[1]) + 1]
    assert reading.startswith("    -> held-out rows whose prompt is in train measure memory more than generalisation")


def test_several_rejected_answers_count_each_comparison(tmp_path):
    """One row, K = 2: [5, 6, 2] vs [5, 7, 2] (same length, 1 token differs) and vs [9]*6 + [2] (shorter by 4,
    differs in 6). Per token: chosen -3/3 = -1 against -6/3 = -2 and -3.5/7 = -0.5 -> higher once."""
    rows = [row([1], [5, 6, 2], [[5, 7, 2], [9] * 6 + [2]], -3.0, [-6.0, -3.5])]
    cache = make_cache(tmp_path / "cache", {"train": rows})
    d = split_diagnostics([cache / "train" / "part-00000.parquet"])
    assert (d.comparisons, d.chosen_longer, d.chosen_shorter, d.few_token_pairs) == (2, 0, 1, 1)
    assert d.length_difference == pytest.approx(-2.0)
    assert d.rejected_per_token == pytest.approx(-1.25) and d.chosen_per_token_higher == 1


@pytest.mark.parametrize("diagnostics, topic, reading", [
    (SplitDiagnostics(comparisons=10, chosen_longer=4, chosen_shorter=4), "length bias", "no strong length bias"),
    (SplitDiagnostics(comparisons=10, chosen_longer=1, chosen_shorter=6), "length bias",
     "chosen answers are mostly shorter: DPO can learn to write shorter rather than better"),
    (SplitDiagnostics(comparisons=4), "repeated prompts", "every prompt occurs once"),
    (SplitDiagnostics(comparisons=4), "small differences", "no pair turns on only a few tokens"),
    (SplitDiagnostics(comparisons=4, chosen_per_token=-2.0, rejected_per_token=-1.5), "reference per token",
     "the chosen answers are less likely for the reference than the rejected ones: unlike what it writes, so DPO "
     "has more to change (watch logps/chosen)"),
    (SplitDiagnostics(comparisons=4, chosen_per_token=-2.0, rejected_per_token=-2.04), "reference per token",
     "the reference finds chosen and rejected answers about equally likely per token"),
])
def test_readings(diagnostics, topic, reading):
    assert dict((t, r) for t, _, r in readings(diagnostics))[topic] == reading
