"""Two writers on one s3:// URL: the clean-up of unlisted objects (remote._remove_unlisted) leaves a later
writer's upload alone. Real moto S3 and real remote._upload for both writers."""

import pyarrow.fs as pafs

import tiny_models
from mlx_dpo.pipeline import remote
from mlx_dpo.schemas.manifest import read_manifest
from test_remote import BUCKET, copy_cache, endpoint, forget_local, many_shards, objects, s3  # noqa: F401 (fixtures: moto's S3 server and a bucket)

run = tiny_models.invoke_cli


class _Delegate(pafs.FileSystemHandler):
    """The real S3 filesystem, with `on_list` run once at the first directory listing: the moment a
    second process's upload lands, between _remove_unlisted's manifest check and its listing."""

    def __init__(self, fs, on_list):
        self.fs, self.on_list = fs, on_list

    def get_type_name(self):
        return "delegate"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        if self.on_list is not None:
            hook, self.on_list = self.on_list, None
            hook()
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def test_a_clean_up_stops_when_a_second_writers_upload_lands_while_it_lists(s3, tiny_model_dir,  # noqa: F811
        standard_data, tmp_path):
    """Review break B: writer Y (`precompute --out URL --overwrite`, several train shards) whose upload lands
    after writer X's first manifest check, while X lists, had its shards part-00001 and up deleted by X's
    clean-up (X's 1-shard manifest does not list them), leaving Y's manifest listing missing objects. X now
    re-reads the manifest before every delete and stops: Y's shards all stay."""
    base = ["precompute", "--model", tiny_model_dir, "--data", standard_data]
    for name, rows in (("x", 16), ("y", 2)):
        result = run(*base, "--out", tmp_path / name, "--rows-per-shard", rows)
        assert result.exit_code == 0, result.output
    url = f"s3://{BUCKET}/caches/race"
    base_path = f"{BUCKET}/caches/race"
    x, y = read_manifest(tmp_path / "x"), read_manifest(tmp_path / "y")
    assert len(y.splits["train"].shards) > len(x.splits["train"].shards) == 1

    def y_uploads():  # another process: precompute --overwrite of the URL, X's manifest found there
        remote._upload(s3, base_path, tmp_path / "y", y, url, replace=True, log=lambda line: None)

    racing = pafs.PyFileSystem(_Delegate(s3, y_uploads))
    remote._upload(racing, base_path, tmp_path / "x", x, url, replace=False, log=lambda line: None)

    with s3.open_input_stream(f"{base_path}/manifest.json") as stream:
        assert stream.read() == (tmp_path / "y" / "manifest.json").read_bytes()  # Y's upload came last
    listed = [s.path for split in y.splits.values() for s in split.shards]
    missing = [p for p in listed if s3.get_file_info(f"{base_path}/{p}").type != pafs.FileType.File]
    assert missing == [], f"the manifest at {url} lists deleted objects: {missing}"

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
