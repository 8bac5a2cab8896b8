"""Review break C: inputs where the stated behaviour of aa9dcb5 (LIVE_CHUNK_ARRAYS 12 -> 9) or 07b8b2f
(the s3 clean-up's manifest re-read) fails. Each test is expected to FAIL on main as it stands."""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from test_logps_chunked import tiny  # noqa: E402

from mlx_dpo.logps import sequence_logps  # noqa: E402


def test_memory_above_the_body_within_the_budget_with_a_trainable_tied_head():
    """Stated (logps.chunk_positions, README, test_logps_chunked): the log-prob memory above the body stays
    within the chunk budget for any V, with and without gradients. What happens: with the tied embedding
    trainable (full fine-tuning), _token_terms's backward keeps one (V, D) head gradient per chunk alive
    (leaf_grads summed lazily), so the extra peak grows with the number of chunks: 70 MB at V = 20,000
    (76 MB at LIVE_CHUNK_ARRAYS = 12), 217 MB at 50,000, 331 MB at 75,000 against a 32 MB budget.
    Same measurement as test_memory_above_the_body_stays_within_the_chunk_budget, only nothing frozen."""
    vocab, budget = 50_000, 32 * 2**20  # chunks of 12 positions: 43 chunks over 510 positions
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask = mx.ones_like(ids)

    def extra_peak(fn) -> int:
        mx.eval(ids, mask)
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    grad = lambda fn: nn.value_and_grad(model, lambda m: fn(m).sum())(model)  # noqa: E731
    body = extra_peak(lambda: grad(lambda m: m.model(ids[:, :-1])))
    ours = extra_peak(lambda: grad(lambda m: sequence_logps(m, ids, mask, budget=budget)[0]))
    assert ours - body <= budget, f"{(ours - body) / 2**20:.0f} MB above the body, budget {budget / 2**20:.0f} MB"


import pyarrow.fs as pafs  # noqa: E402

import tiny_models  # noqa: E402
from test_remote import BUCKET, copy_cache, endpoint, forget_local, many_shards, objects, s3  # noqa: E402,F401


def test_an_empty_split_folder_left_by_a_clean_up_cut_short_is_removed_by_the_next_upload(s3, many_shards):  # noqa: F811
    """Stated (README "Caches on object storage", remote._remove_unlisted): a clean-up cut short (a kill, or a
    storage error on a manifest re-read / folder check, which raises before _remove_empty_folder) leaves
    only objects no manifest lists, removed by the next upload to the URL; an older cache with more splits
    leaves none behind, no empty folder (test_overwrite_with_fewer_shards_and_splits...). What happens: once
    the old valid/ objects are deleted (pyarrow leaves an empty `valid/` marker) and the run stops before
    the folder removal, the next --overwrite never removes `valid/`: its clean-up only visits the folders
    of objects it deletes itself, and there are none left in valid/."""
    url = copy_cache(s3, "cut-folder", "caches/many")
    assert tiny_models.invoke_cli(*many_shards, "--out", url, "--overwrite").exit_code == 0
    rebuilt = objects(s3, "caches/cut-folder")
    copy_cache(s3, "cut-folder", "caches/many")  # the old cache back under the rebuilt one's objects
    for name, data in rebuilt.items():
        with s3.open_output_stream(f"{BUCKET}/caches/cut-folder/{name}") as stream:
            stream.write(data)
    # The clean-up deleted valid/'s objects (sorted last), then stopped before _remove_empty_folder.
    for name in objects(s3, "caches/cut-folder"):
        if name.startswith("valid/"):
            s3.delete_file(f"{BUCKET}/caches/cut-folder/{name}")
    forget_local()
    result = tiny_models.invoke_cli(*many_shards, "--out", url, "--overwrite")
    assert result.exit_code == 0, result.output
    assert s3.get_file_info(f"{BUCKET}/caches/cut-folder/valid").type == pafs.FileType.NotFound, \
        "an empty valid/ folder of the old cache stays after the next upload"
