"""Break of issue 14 item 1's stated exactness bound, on the README's own demo iteration.

Stated (issue 14 item 1): the reused cache's values "equal a fresh precompute within float32 rounding
(test: <= 1e-5 per row)". The README's demo: the demo data plus 100 new pairs from the demo's
generator, precomputed with reuse from the demo cache, vs the same precompute with --no-reuse.

What happens: 10 of the 1,700 train rows differ by 1.52587890625e-05 (2 units in the last place of a
sum near -70) in ref_chosen_logps / ref_rejected_logps: above the issue's 1e-5. The README documents
"up to 2 units in the last place (1.5e-5 on the demo's sums)", and tests/pipeline/test_reuse.py checks
max(1e-5, 2 ulp), not the issue's bound. Either the bound in the issue is relaxed or reuse must match.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny_models

pytestmark = pytest.mark.slow


def values(cache, split):
    table = pq.read_table(sorted((cache / split).glob("part-*.parquet"))).to_pandas()
    return table.set_index("index").sort_index()


def test_reused_values_are_within_1e_5_of_a_fresh_precompute_on_the_demo(tmp_path):
    from mlx_dpo.demo import TRAIN_CITIES, TRAIN_PROMPTS, build_demo, make_rows

    build_demo(tmp_path / ".demo")
    model, data = tmp_path / ".demo" / "model", tmp_path / ".demo" / "data"
    run = tiny_models.run_cli
    run("precompute", "--model", model, "--data", data, "--out", tmp_path / "caches" / "demo", "--max-length", 256)
    more = tmp_path / "data-more"
    more.mkdir()
    (more / "valid.jsonl").write_text((data / "valid.jsonl").read_text())
    rows = [json.loads(line) for line in open(data / "train.jsonl")] + make_rows(100, TRAIN_CITIES, TRAIN_PROMPTS, seed=3)
    (more / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reused = run("precompute", "--model", model, "--data", more, "--out", tmp_path / "caches" / "more",
                 "--max-length", 256).output
    assert "1,600 reused from" in reused and "100 computed" in reused, reused
    run("precompute", "--model", model, "--data", more, "--out", tmp_path / "fresh" / "more", "--max-length", 256,
        "--no-reuse")
    worst = {}
    for split in ("train", "valid"):
        ours, fresh = values(tmp_path / "caches" / "more", split), values(tmp_path / "fresh" / "more", split)
        assert list(ours.index) == list(fresh.index)
        for column in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps"):
            diff = np.abs(ours[column].to_numpy(np.float64) - fresh[column].to_numpy(np.float64))
            worst[f"{split} {column}"] = (float(diff.max()), int((diff > 1e-5).sum()))
    assert all(d <= 1e-5 for d, _ in worst.values()), worst
