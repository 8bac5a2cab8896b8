"""Two writers on one s3:// URL: the clean-up of unlisted objects (remote._remove_unlisted) leaves a later
writer's upload alone. Real moto S3 and real remote._upload for both writers."""

import pyarrow.fs as pafs

import tiny_models
from mlx_dpo.pipeline import remote
from mlx_dpo.schemas.manifest import read_manifest
from test_remote import BUCKET, endpoint, s3  # noqa: F401 (fixtures: moto's S3 server and a bucket)

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
