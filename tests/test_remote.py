"""Caches on object storage: precompute to s3://, reuse, train and verify from it, refuse bad
objects; against moto's S3 server (a local process, no network)."""

import hashlib
import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pyarrow.fs as pafs
import pytest

import tiny_models
from mlx_dpo.pipeline import remote

BUCKET = "mlx-dpo-test"
CACHE_URL = f"s3://{BUCKET}/caches/c1"


run = tiny_models.invoke_cli


def one_line_error(result, expected):
    assert result.exit_code == 1, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def forget_local():
    """Drop staging and mirrors, so only the bucket can answer."""
    shutil.rmtree(remote.user_cache_dir(), ignore_errors=True)


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # answering
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def s3(endpoint, tmp_path_factory):
    """The usual AWS_* variables pointing at the server, a private user cache, and a bucket."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        host = endpoint.removeprefix("http://")
        pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        yield remote.open_location(f"s3://{BUCKET}")[0]


@pytest.fixture(scope="module")
def uploaded(s3, tiny_model_dir, standard_data):
    """precompute --out s3://..., recording the order of the uploads."""
    order = []
    put = remote._put
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remote, "_put", lambda fs, local, path, name: order.append(name) or put(fs, local, path, name))
        result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", CACHE_URL,
                     "--rows-per-shard", 8)
    assert result.exit_code == 0, result.output
    return result.output, order


def objects(fs, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                found[info.path.removeprefix(f"{BUCKET}/{prefix}/")] = stream.read()
    return found


def copy_cache(fs, name: str, source: str = "caches/c1") -> str:
    """A copy of the uploaded cache (or of `source`'s objects) under caches/<name>, to damage."""
    for relative in objects(fs, source):
        fs.copy_file(f"{BUCKET}/{source}/{relative}", f"{BUCKET}/caches/{name}/{relative}")
    return f"s3://{BUCKET}/caches/{name}"


def test_locations(s3):
    assert remote.is_remote(CACHE_URL) and not remote.is_remote("caches/c1") and not remote.is_remote("/tmp/c")
    assert remote.staging_dir(CACHE_URL + "/") == remote.staging_dir(CACHE_URL)
    assert remote.staging_dir(CACHE_URL).is_relative_to(remote.user_cache_dir())
    with pytest.raises(remote.UserError, match="gs://b/c: not a cache location"):
        remote.open_location("gs://b/c")


def test_precompute_uploads_every_file_manifest_last(s3, uploaded):
    output, order = uploaded
    assert f"Uploaded {CACHE_URL}" in output, output
    stored = objects(s3, "caches/c1")
    assert sorted(stored) == sorted(["manifest.json", "rejects.jsonl", "train/part-00000.parquet",
                                     "train/part-00000.rejects.jsonl", "train/part-00001.parquet",
                                     "train/part-00001.rejects.jsonl"])
    assert sorted(order) == sorted(f"{CACHE_URL}/{name}" for name in stored)
    assert order[-1] == f"{CACHE_URL}/manifest.json"  # last: a reader never sees a partial cache
    manifest = json.loads(stored["manifest.json"])
    for shard in manifest["splits"]["train"]["shards"]:
        assert hashlib.sha256(stored[shard["path"]]).hexdigest() == shard["sha256"]
    # the staging directory became the local mirror
    assert not remote.staging_dir(CACHE_URL).exists()
    assert (remote.user_cache_dir() / "remote" / manifest["identity"] / "manifest.json").is_file()


def test_rerun_reuses_the_remote_cache(s3, uploaded, tiny_model_dir, standard_data):
    forget_local()
    before = s3.get_file_info(f"{BUCKET}/caches/c1/manifest.json").mtime
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", CACHE_URL,
                 "--rows-per-shard", 8)
    assert result.exit_code == 0, result.output
    assert f"Reusing cache {CACHE_URL} (identity" in result.output, result.output
    assert "Uploaded" not in result.output and "written in" not in result.output
    assert s3.get_file_info(f"{BUCKET}/caches/c1/manifest.json").mtime == before


def test_precompute_refuses_other_inputs_at_the_url(s3, uploaded, tiny_model_dir, standard_data):
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", CACHE_URL,
                 "--rows-per-shard", 8, "--max-length", 64)
    one_line_error(result, f"{CACHE_URL}: holds a cache of other inputs")


def test_train_from_s3_step1_is_ln2(s3, uploaded, tiny_model_dir, tmp_path):
    forget_local()
    result = run("train", "--cache", CACHE_URL, "--model", tiny_model_dir, "--output", tmp_path / "run",
                 "--iters", 2, "--batch-size", 4, "--learning-rate", 1e-2, "--steps-per-report", 1)
    assert result.exit_code == 0, result.output
    assert "(5 of 5 files downloaded)" in result.output, result.output
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first = next(r for r in records if r["split"] == "train")
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)

    logs = []
    mirror = remote.fetch(CACHE_URL, log=logs.append)  # all there: nothing to download
    assert "(0 of 5 files downloaded)" in logs[-1]
    shard = mirror / "train" / "part-00000.parquet"
    good = shard.read_bytes()
    shard.write_bytes(bytes(255 - b for b in good))  # a damaged local copy is fetched again
    remote.fetch(CACHE_URL, log=logs.append)
    assert "(1 of 5 files downloaded)" in logs[-1] and shard.read_bytes() == good


def test_cache_verify_and_inspect_take_a_url(s3, uploaded):
    forget_local()
    verify = run("cache", "verify", CACHE_URL)
    assert verify.exit_code == 0 and ": OK (" in verify.output, verify.output
    inspect = run("cache", "inspect", CACHE_URL)
    assert inspect.exit_code == 0 and "Rows" in inspect.output, inspect.output


@pytest.mark.parametrize("damage, expected", [
    (lambda data: bytes(255 - b for b in data), "sha256 differs from the manifest"),
    (lambda data: data[:-10], "bytes, manifest says"),
])
def test_corrupted_remote_shard_is_refused(s3, uploaded, tiny_model_dir, tmp_path, damage, expected):
    url = copy_cache(s3, "bad")
    shard = f"{BUCKET}/caches/bad/train/part-00001.parquet"
    with s3.open_input_stream(shard) as stream:
        data = stream.read()
    with s3.open_output_stream(shard) as stream:
        stream.write(damage(data))
    forget_local()
    result = run("train", "--cache", url, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1)
    one_line_error(result, f"{url}/train/part-00001.parquet: ")
    assert expected in result.output
    assert not list(remote.user_cache_dir().glob("remote/*/train/part-00001.parquet"))


@pytest.mark.parametrize("url", [f"s3://{BUCKET}/caches/nothing", "s3://no-such-bucket-here/c"])
def test_url_without_a_cache(s3, tmp_path, tiny_model_dir, url):
    result = run("train", "--cache", url, "--model", tiny_model_dir, "--output", tmp_path / "run")
    one_line_error(result, f"{url}: not a complete mlx-dpo cache (no manifest.json")


def test_manifest_paths_outside_the_cache_are_refused(s3, uploaded):
    url = copy_cache(s3, "escape")
    manifest = json.loads(objects(s3, "caches/escape")["manifest.json"])
    manifest["splits"]["train"]["shards"][0]["path"] = "../c1/train/part-00000.parquet"
    with s3.open_output_stream(f"{BUCKET}/caches/escape/manifest.json") as stream:
        stream.write(json.dumps(manifest).encode())
    one_line_error(run("cache", "verify", url), f"{url}: manifest path '../c1/train/part-00000.parquet' points outside")


def test_precompute_reuses_rows_of_a_remote_cache(s3, uploaded, tiny_model_dir, tmp_path):
    """--reuse-from s3://...: the cache is mirrored (sha256 on the way), verified, and its rows reused."""
    new = [{"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."}]
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + new)
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "alone" / "c",
                 "--rows-per-shard", 8, "--reuse-from", CACHE_URL)
    assert result.exit_code == 0, result.output
    assert f"train: 13 rows: 12 reused from {CACHE_URL}, 1 computed" in result.output


def _damaged_copy(fs) -> str:
    url = copy_cache(fs, "damaged-source")
    shard = f"{BUCKET}/caches/damaged-source/train/part-00001.parquet"
    with fs.open_input_stream(shard) as stream:
        data = stream.read()
    with fs.open_output_stream(shard) as stream:
        stream.write(bytes(255 - b for b in data))  # same size: only the sha256 tells
    return url


@pytest.mark.parametrize("source, reason", [("missing", "not a complete mlx-dpo cache"), ("damaged", "sha256 differs")])
def test_a_missing_or_damaged_remote_reuse_source_is_named_and_not_used(s3, uploaded, tiny_model_dir, standard_data,
                                                                         tmp_path, source, reason):
    """Like a local --reuse-from without a cache: the s3:// source is named with its problem and precompute
    goes on, computing the rows it would have given."""
    url = f"s3://{BUCKET}/caches/nothing" if source == "missing" else _damaged_copy(s3)
    forget_local()
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", standard_data,
                                    "--out", tmp_path / "b" / "c", "--reuse-from", url)
    assert result.exit_code == 0, result.output
    line = [x for x in result.output.splitlines() if x.startswith(f"{url}: not reused: ")]
    assert len(line) == 1 and reason in line[0], result.output
    assert "reused from" not in result.output and (tmp_path / "b" / "c" / "manifest.json").is_file()
    assert tiny_models.invoke_cli("cache", "verify", tmp_path / "b" / "c").exit_code == 0


def test_overwrite_in_place_reuses_the_old_remote_cache(s3, uploaded, tiny_model_dir, tmp_path):
    """As for a local --out (README, reuse): `--out URL --overwrite` reads and verifies the old cache at
    the URL (from the bucket, sha256 on the way) as a source, so only the new rows run through the model."""
    url = copy_cache(s3, "overwrite")
    forget_local()
    new = [{"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."}]
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + new)
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", url, "--rows-per-shard", 8,
                 "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"train: 13 rows: 12 reused from {url}, 1 computed" in result.output, result.output
    forget_local()
    assert run("cache", "verify", url).exit_code == 0
    assert json.loads(objects(s3, "caches/overwrite")["manifest.json"])["splits"]["train"]["rows_in"] == 13


def test_a_swap_cut_short_in_staging_does_not_hide_the_remote_cache(s3, tiny_model_dir, standard_data, tmp_path):
    """A `precompute --out URL --overwrite` killed during its swap in the local staging directory (the state
    test_overwrite's _cut_swap builds there): the bucket still holds the old cache, whole, so the old command
    again reuses it (the staging copy of a rebuild never uploaded does not speak for the URL), and the new
    command with --overwrite then uploads the new cache."""
    url = f"s3://{BUCKET}/caches/cut"
    old = ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", url, "--max-length", 40]
    assert run(*old).exit_code == 0
    before = objects(s3, "caches/cut")
    new = ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--max-length", 24]
    assert run(*new, "--out", tmp_path / "new", "--no-reuse").exit_code == 0
    work = remote.staging_dir(url) / ".mlx-dpo-rebuild"
    shutil.copytree(tmp_path / "new", work, ignore=shutil.ignore_patterns(".*"))
    files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file() and p.name != "manifest.json")
    (work / "swap.json").write_text(json.dumps({"files": files + ["manifest.json"]}))
    again = run(*old)
    assert again.exit_code == 0 and f"Reusing cache {url}" in again.output, again.output
    assert objects(s3, "caches/cut") == before
    rebuilt = run(*new, "--out", url, "--overwrite")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(objects(s3, "caches/cut")["manifest.json"])["max_length"] == 24
    forget_local()
    assert run("cache", "verify", url).exit_code == 0


ONE_SHARD = ["manifest.json", "rejects.jsonl", "train/part-00000.parquet", "train/part-00000.rejects.jsonl"]


@pytest.fixture(scope="module")
def many_shards(s3, tiny_model_dir, standard_data):
    """caches/many: 4 train and 2 valid shards; and the precompute command (no --out) of 1 train shard."""
    base = ["precompute", "--model", tiny_model_dir, "--data", standard_data]
    result = run(*base, "--out", f"s3://{BUCKET}/caches/many", "--rows-per-shard", 2, "--valid-fraction", 0.3)
    assert result.exit_code == 0, result.output
    assert len(objects(s3, "caches/many")) == 2 + 2 * 6
    return [*base, "--rows-per-shard", 16]


def test_overwrite_with_fewer_shards_and_splits_removes_the_old_ones_from_the_bucket(s3, many_shards):
    """As a local --overwrite (rebuild.py): 4 train + 2 valid shards rebuilt as 1 train shard leave none of
    the old shards, sidecars or splits in the bucket (review break14b: 10 objects no manifest listed
    stayed)."""
    url = copy_cache(s3, "shrink", "caches/many")
    forget_local()
    result = run(*many_shards, "--out", url, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(objects(s3, "caches/shrink")) == ONE_SHARD
    assert s3.get_file_info(f"{BUCKET}/caches/shrink/valid").type == pafs.FileType.NotFound  # no empty folder
    assert f"Removed 10 objects of an older cache from {url}" in result.output, result.output
    forget_local()
    assert run("cache", "verify", url).exit_code == 0


def test_overwrite_removes_only_the_cache_own_names_at_its_url(s3, many_shards):
    """Other objects at the URL, in its split folders too, a cache in a sub-folder (caches/near/inner) and
    one at a sibling prefix (caches/near2: '/' is the boundary, not the string prefix) stay whole; a temp
    file of a local write (a cache copied up by hand) goes, as in the local swap."""
    url = copy_cache(s3, "near", "caches/many")
    neighbours = {name: copy_cache(s3, name, "caches/many") for name in ("near2", "near/inner")}
    before = {name: objects(s3, f"caches/{name}") for name in neighbours}
    users = ["notes.txt", "manifest.json.bak", "train/notes.txt", "train/part-00001.parquet.bak",
             "train/part-1.parquet", "valid/old/part-00000.parquet", "test/part-00000.parquet"]
    for name in [*users, "train/.part-00002.4242.tmp"]:
        with s3.open_output_stream(f"{BUCKET}/caches/near/{name}") as stream:
            stream.write(b"not the new cache's")
    forget_local()
    result = run(*many_shards, "--out", url, "--overwrite")
    assert result.exit_code == 0, result.output
    inner = [f"inner/{name}" for name in before["near/inner"]]
    assert sorted(objects(s3, "caches/near")) == sorted(ONE_SHARD + users + inner)
    assert f"Removed 11 objects of an older cache from {url}" in result.output, result.output
    forget_local()
    for name, stored in before.items():
        assert objects(s3, f"caches/{name}") == stored
        assert run("cache", "verify", f"s3://{BUCKET}/caches/{name}").exit_code == 0
    assert run("cache", "verify", url).exit_code == 0


def test_a_clean_up_or_an_upload_cut_short_is_finished_by_the_next_upload(s3, many_shards):
    """The bucket as a kill leaves it: (a) during the clean-up, the new manifest up and old objects left:
    the cache verifies, a plain precompute reuses it and writes nothing, --overwrite removes them; (b)
    during --overwrite's upload, the old manifest deleted (its first step): a plain precompute uploads
    the cache and removes the old objects."""
    url = copy_cache(s3, "cut-clean", "caches/many")
    assert run(*many_shards, "--out", url, "--overwrite").exit_code == 0
    rebuilt = objects(s3, "caches/cut-clean")
    copy_cache(s3, "cut-clean", "caches/many")  # the old cache's objects back, under the rebuilt cache's
    for name, data in rebuilt.items():
        with s3.open_output_stream(f"{BUCKET}/caches/cut-clean/{name}") as stream:
            stream.write(data)
    cut = objects(s3, "caches/cut-clean")
    assert len(cut) == 14
    forget_local()
    assert run("cache", "verify", url).exit_code == 0
    again = run(*many_shards, "--out", url)
    assert again.exit_code == 0 and f"Reusing cache {url}" in again.output, again.output
    assert objects(s3, "caches/cut-clean") == cut
    assert run(*many_shards, "--out", url, "--overwrite").exit_code == 0
    assert sorted(objects(s3, "caches/cut-clean")) == ONE_SHARD

    url = copy_cache(s3, "cut-upload", "caches/many")
    s3.delete_file(f"{BUCKET}/caches/cut-upload/manifest.json")
    forget_local()
    result = run(*many_shards, "--out", url)
    assert result.exit_code == 0 and f"Uploaded {url}" in result.output, result.output
    assert sorted(objects(s3, "caches/cut-upload")) == ONE_SHARD
    forget_local()
    assert run("cache", "verify", url).exit_code == 0
