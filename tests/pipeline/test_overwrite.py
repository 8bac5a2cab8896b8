"""`precompute --overwrite` onto an existing cache keeps the old cache whole until the new one is
complete (pipeline/rebuild.py): a rebuild that fails, is interrupted (Ctrl-C) or killed leaves the old
cache as it was, verifying, the only cache `cache ls` and reuse find there; run again, it resumes; a
swap into place cut short by a crash is finished by the next precompute of the folder."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import tiny_models
from mlx_dpo.schemas.manifest import find_caches

run = tiny_models.invoke_cli
OLD, NEW = (24, 8), (30, 16)  # (--max-length, --rows-per-shard): other identities, other shard plans
REBUILD, RECORD = ".mlx-dpo-rebuild", "swap.json"  # pipeline/rebuild.py's folder and swap record


def args(model, data, out, options, *extra):
    max_length, rows_per_shard = options
    return ["precompute", "--model", model, "--data", data, "--out", out, "--max-length", max_length,
            "--rows-per-shard", rows_per_shard, "--tokens-per-batch", 256, *extra]


def files_of(folder):
    """Relative path -> bytes of every file in `folder`, except the hidden top-level entries (the lock
    file a killed writer leaves, an unfinished rebuild)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")}


def assert_verifies(cache):
    result = run("cache", "verify", cache)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    rows = [{**r, "prompt": f"{i} {r['prompt']}"} for i in range(20) for r in tiny_models.standard_rows()]
    return tiny_models.write_jsonl(tmp_path_factory.mktemp("many") / "many.jsonl", rows)


@pytest.fixture(scope="module")
def built(tiny_model_dir, many_rows, tmp_path_factory):
    """The caches of many_rows under OLD and NEW, each built fresh in a folder of its own (read-only)."""
    caches = {}
    for name, options in (("old", OLD), ("new", NEW)):
        caches[name] = tmp_path_factory.mktemp(name) / "cache"
        result = run(*args(tiny_model_dir, many_rows, caches[name], options))
        assert result.exit_code == 0, result.output
    return caches


@pytest.fixture
def cache(built, tmp_path):
    """A copy of the old cache, with a file of the user's in its folder (never touched)."""
    target = tmp_path / "caches" / "v1"
    shutil.copytree(built["old"], target)
    (target / "notes.txt").write_text("mine")
    return target


def broken_model(tiny_model_dir, folder):
    """The tiny model with one layer more in config.json than its weights hold: it hashes and
    tokenizes, and mlx-lm refuses to load it, so precompute fails only when the model is needed."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_failed_rebuild_leaves_the_old_cache(cache, tiny_model_dir, many_rows, tmp_path):
    before = files_of(cache)
    model = broken_model(tiny_model_dir, tmp_path / "broken")
    result = run(*args(model, many_rows, cache, OLD, "--overwrite"))
    assert result.exit_code == 1 and "could not load the model" in result.output, result.output
    assert files_of(cache) == before
    assert_verifies(cache)
    assert find_caches(cache.parent) == [(cache, None)]
    # A precompute of the folder without --overwrite tidies the unfinished rebuild away.
    result = run(*args(tiny_model_dir, many_rows, cache, OLD))
    assert result.exit_code == 0 and "Reusing cache" in result.output, result.output
    assert not (cache / REBUILD).exists() and files_of(cache) == before


def _changed_shards(folder, before: dict) -> list:
    """Shard files under `folder` written since `before` (path -> mtime); files may vanish meanwhile."""
    changed = []
    for path in folder.rglob("part-*.parquet"):
        try:
            if before.get(path) != path.stat().st_mtime_ns:
                changed.append(path)
        except FileNotFoundError:
            pass
    return changed


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_rebuild_leaves_the_old_cache_and_resumes(cache, built, tiny_model_dir, many_rows, tmp_path, stop):
    before = files_of(cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("part-*.parquet")}
    command = [sys.executable, "-m", "mlx_dpo", *map(str, args(tiny_model_dir, many_rows, cache, NEW, "--overwrite"))]
    # SIGINT as at a terminal, even when the tests run where it is ignored (a background job).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(_changed_shards(cache, stamps)) < 3:  # three new shards written, a dozen to come
        assert process.poll() is None and time.monotonic() < deadline, "precompute ended before it was stopped"
        time.sleep(0.002)
    process.send_signal(stop)
    _, stderr = process.communicate()
    assert process.returncode != 0
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "Aborted." in stderr, stderr  # Ctrl-C's exit, as click reports it

    assert files_of(cache) == before
    assert_verifies(cache)
    assert find_caches(cache.parent) == [(cache, None)]  # what `cache ls` lists and reuse reads

    done = {p.relative_to(cache / REBUILD): p.stat().st_mtime_ns for p in (cache / REBUILD).rglob("part-*.parquet")}
    assert 3 <= len(done) < 15
    result = run(*args(tiny_model_dir, many_rows, cache, NEW, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert {rel: (cache / rel).stat().st_mtime_ns for rel in done} == done  # resumed: moved in, not redone
    expected = {**files_of(built["new"]), "notes.txt": b"mine"}
    now = files_of(cache)
    assert now.keys() == expected.keys()  # the old cache's shards past the new plan are gone
    manifests = [json.loads(files.pop("manifest.json")) for files in (now, expected)]
    for manifest in manifests:
        manifest.pop("created_at")
    assert now == expected and manifests[0] == manifests[1]
    assert_verifies(cache)
    assert not (cache / REBUILD).exists()


def _cut_swap(cache, new, moved: int) -> None:
    """The state a process killed during swap_in leaves: the new cache complete in the rebuild folder,
    its record written, and (moved > 0) the old manifest removed and the first `moved` files renamed in."""
    work = cache / REBUILD
    shutil.copytree(new, work)
    files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file() and p.name != "manifest.json")
    (work / RECORD).write_text(json.dumps({"files": files + ["manifest.json"]}))
    if moved:
        (cache / "manifest.json").unlink()
    for name in (files + ["manifest.json"])[:moved]:
        (cache / name).parent.mkdir(exist_ok=True)
        (work / name).replace(cache / name)


@pytest.mark.parametrize("cut", ["after the record", "after one file", "half way", "before the manifest", "after it"])
def test_a_swap_cut_short_is_finished_by_the_next_precompute(cache, built, tiny_model_dir, many_rows, cut):
    files = len(files_of(built["new"]))  # rejects.jsonl, 15 shards and their sidecars, the manifest
    moved = {"after the record": 0, "after one file": 1, "half way": files // 2, "before the manifest": files - 1,
             "after it": files}[cut]
    _cut_swap(cache, built["new"], moved)
    if 0 < moved < files:
        assert run("cache", "verify", cache).exit_code == 1  # no manifest: refused, never half old, half new
    result = run(*args(tiny_model_dir, many_rows, cache, NEW))
    assert result.exit_code == 0 and "Reusing cache" in result.output, result.output  # nothing recomputed
    assert files_of(cache) == {**files_of(built["new"]), "notes.txt": b"mine"}
    assert_verifies(cache)
    assert not (cache / REBUILD).exists()


def test_shard_jobs_rebuild_beside_the_old_output_too(cache, tiny_model_dir, many_rows, tmp_path):
    """A --num-shards job with --overwrite swaps its shard set in (its partial record last)."""
    parts = [cache, tmp_path / "part1"]
    for i, part in enumerate(parts):
        result = run(*args(tiny_model_dir, many_rows, part, NEW, "--num-shards", 2, "--shard-index", i, "--overwrite"))
        assert result.exit_code == 0, result.output
    assert not (cache / "manifest.json").exists() and (cache / "partial.json").is_file()
    assert (cache / "notes.txt").read_text() == "mine" and not (cache / REBUILD).exists()
    result = run("cache", "merge", tmp_path / "merged", *parts)
    assert result.exit_code == 0, result.output
    assert_verifies(tmp_path / "merged")


@pytest.mark.parametrize("path", ["train/part-00000.parquet", "train/part-00001.rejects.jsonl", "rejects.jsonl",
                                  "last shard"])
def test_overwrite_repairs_a_cache_whose_file_became_a_folder(cache, built, tiny_model_dir, many_rows, path):
    """--overwrite is the repair `cache verify` recommends: a cache file's path that is a folder (one the new
    cache has, or, "last shard", one the new plan of fewer shards drops) is removed by the swap, which neither
    crashes half way nor leaves a folder no precompute repairs."""
    folder = sorted((cache / "train").glob("part-*.parquet"))[-1] if path == "last shard" else cache / path
    folder.unlink()
    folder.mkdir()
    (folder / "stray").write_text("x")
    if path != "train/part-00001.rejects.jsonl":  # a shard's sidecar is precompute's resume mark, not verified
        assert run("cache", "verify", cache).exit_code == 1
    result = run(*args(tiny_model_dir, many_rows, cache, NEW, "--overwrite"))
    assert result.exit_code == 0, (result.output, repr(result.exception))
    assert_verifies(cache)
    assert not folder.is_dir() and (cache / "notes.txt").read_text() == "mine" and not (cache / REBUILD).exists()
    again = run(*args(tiny_model_dir, many_rows, cache, NEW))
    assert again.exit_code == 0 and "Reusing cache" in again.output, again.output


def test_a_swap_that_cannot_finish_is_refused_before_the_old_manifest_goes(cache, built, tiny_model_dir, many_rows):
    """A split folder that is a file: the rebuild is refused in one line naming it, before anything of
    the old one is removed; each later precompute says so too, and once it is removed the swap finishes."""
    shutil.rmtree(cache / "train")
    (cache / "train").write_text("x")
    manifest = (cache / "manifest.json").read_bytes()
    result = run(*args(tiny_model_dir, many_rows, cache, NEW, "--overwrite"))
    assert result.exit_code == 1, result.output
    assert f"{cache / 'train'}: not a folder, where the rebuilt cache's train/" in result.output, result.output
    assert "Traceback" not in result.output and (cache / "manifest.json").read_bytes() == manifest
    (cache / "train").unlink()
    result = run(*args(tiny_model_dir, many_rows, cache, NEW, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert_verifies(cache)
