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


def test_compiled_memory_above_the_body_within_the_budget_when_the_chunk_fills_it():
    """Stated (logps.chunk_positions, README, test_logps_chunked): log-prob memory above the body within the
    chunk budget for any V, with and without gradients, inside mx.compile. What happens: at V = 25,880 with a
    32 MB budget, budget // (9 x 4 x V) = 36 is a whole number of tiles, so the chunk (36 positions) makes 9
    chunk-sized arrays exactly the budget; compiled, the pass holds ~9 of them plus its small arrays: 32.4 MB
    forward, 33.4 MB with gradients (at LIVE_CHUNK_ARRAYS = 12, chunks of 24: 20.5 MB). Not compiled it stays at
    27 MB, which is why test_logps_chunked's (uncompiled, V = 16k/32k) peak test passes. The same at V = 19,400,
    38,800 and 77,600 (chunks of 48, 24, 12)."""
    import numpy as np

    from mlx_dpo.logps import score_plan

    vocab, budget = 25_880, 32 * 2**20
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask, shared = mx.ones_like(ids), mx.array([5, 5])
    plan = mx.array(score_plan(np.asarray(mask)))
    model.freeze()
    model.model.layers[0].unfreeze()
    grad = lambda fn: nn.value_and_grad(model, fn)(model)  # noqa: E731
    body = mx.compile(lambda i: grad(lambda m: m.model(i[:, :-1]).sum()))
    ours = mx.compile(lambda i, k, p, s: grad(lambda m: sum(x.sum() for x in sequence_logps(m, i, k, s, p, budget=budget))))

    def extra_peak(fn) -> int:
        fn()  # compiled once outside the measurement
        mx.eval(ids, mask, plan, shared)
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    extra = extra_peak(lambda: ours(ids, mask, plan, shared)) - extra_peak(lambda: body(ids))
    assert extra <= budget, f"{extra / 2**20:.1f} MB above the body, budget {budget / 2**20:.0f} MB"


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


def test_a_second_writer_mid_upload_is_not_reported_as_our_complete_cache(s3, many_shards, tiny_model_dir,  # noqa: F811
        standard_data, tmp_path):
    """Stated (07b8b2f, README "Caches on object storage"): the clean-up re-reads manifest.json before every
    delete and stops once another upload replaced it; its error says "the new cache is uploaded and
    complete ... rerun with --overwrite". What happens: when the second writer Y (`--overwrite`) is mid-upload
    at X's re-read, Y has deleted the manifest (its first step), the re-read raises FileNotFoundError (an
    OSError) and X fails with "the new cache is uploaded and complete": false, no manifest is at the URL,
    and the advice (--overwrite) deletes Y's manifest-to-be again. Real moto S3, real remote._upload."""
    from mlx_dpo.errors import UserError
    from mlx_dpo.pipeline import remote
    from mlx_dpo.schemas.manifest import read_manifest
    from test_remote_writers import _Delegate

    base = ["precompute", "--model", tiny_model_dir, "--data", standard_data]
    for name, rows in (("x", 2), ("y", 16)):
        result = tiny_models.invoke_cli(*base, "--out", tmp_path / name, "--rows-per-shard", rows)
        assert result.exit_code == 0, result.output
    url, base_path = f"s3://{BUCKET}/caches/midway", f"{BUCKET}/caches/midway"
    x = read_manifest(tmp_path / "x")
    old = copy_cache(s3, "midway", "caches/many")  # an older cache with more shards: X has objects to remove
    assert old == url

    def y_starts():  # another process's --overwrite: manifest deleted, its first shard going up
        s3.delete_file(f"{base_path}/manifest.json")
        with s3.open_output_stream(f"{base_path}/train/part-00000.parquet") as stream:
            stream.write((tmp_path / "y" / "train" / "part-00000.parquet").read_bytes())

    racing = pafs.PyFileSystem(_Delegate(s3, y_starts))
    try:
        remote._upload(racing, base_path, tmp_path / "x", x, url, replace=True, log=lambda line: None)
    except UserError as error:
        assert "uploaded and complete" not in str(error), f"no manifest is at {url}, yet: {error}"
    assert s3.get_file_info(f"{base_path}/train/part-00000.parquet").type == pafs.FileType.File
