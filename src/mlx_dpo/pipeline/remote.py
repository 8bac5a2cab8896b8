"""Caches on object storage (`s3://bucket/prefix`), moved whole between it and local directories.

The pipeline and the trainer stay on local files: they need atomic renames, resume and memory-mapped
reads. `precompute` builds in a local staging directory and uploads every file, manifest.json last, so
a reader never takes a half-uploaded cache as complete, then deletes an older cache's objects the new
manifest does not list (_remove_unlisted); `train` and `cache verify/inspect` download the
manifest and then the files it lists into a local mirror, checking each shard's sha256 on the way.
"""

import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ..errors import UserError
from ..schemas import Manifest
from ..schemas.atomic import atomic_path
from ..schemas.manifest import CACHE_SPLITS, MANIFEST_NAME, parse_manifest
from ..schemas.verify import check_cache, file_sha256, inside
from .lock import LOCK_NAME

_CHUNK = 1 << 22
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location) -> bool:
    """True for a URL (`s3://bucket/prefix`), False for a local path."""
    return bool(_URL.match(str(location)))


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-dpo"


def staging_dir(url: str) -> Path:
    """Where `precompute --out URL` builds, so an interrupted run resumes from there."""
    return user_cache_dir() / "staging" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def open_location(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `url` and the cache's path in it. Credentials come from the AWS SDK's usual
    sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ~/.aws)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{url}: not a cache location (a local directory or s3://bucket/prefix)")
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:  # pyarrow's S3FileSystem does not read these variables itself
        parts = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif not endpoint:
        try:  # as FileSystem.from_uri does: a bucket in another region answers with a redirect
            options["region"] = pafs.resolve_s3_region(parsed.netloc)
        except OSError:
            pass
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")


@contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """pyarrow's OSErrors (network, credentials, missing bucket) as one line naming the URL."""
    try:
        yield
    except OSError as error:
        raise UserError(f"{url}: {' '.join(str(error).split())}") from error


def _size(fs: pafs.FileSystem, path: str) -> int | None:
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def _read_manifest(fs: pafs.FileSystem, base: str, url: str) -> tuple[Manifest, bytes] | None:
    """The remote manifest and its bytes, or None when there is none."""
    path = f"{base}/{MANIFEST_NAME}"
    if _size(fs, path) is None:
        return None
    with fs.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        manifest = parse_manifest(raw, url)
    except ValueError as error:
        raise UserError(str(error)) from error
    if not re.fullmatch(r"[0-9a-f]{16,128}", str(manifest.identity)):  # it names the local mirror
        raise UserError(f"{url}/{MANIFEST_NAME}: identity {manifest.identity!r} is not a hash")
    return manifest, raw


def cache_files(manifest: Manifest, root: Path, url: str) -> list[tuple[str, str | None]]:
    """(path relative to the cache, sha256 or None) of every file of a cache but its manifest:
    shards, their rejects sidecars (precompute's resume marks) and the rejects file."""
    files = []
    for split in manifest.splits.values():
        for shard in split.shards:
            files += [(shard.path, shard.sha256), (str(Path(shard.path).with_suffix(".rejects.jsonl")), None)]
    if manifest.rejects_file:
        files.append((manifest.rejects_file, None))
    for relative, _ in files:
        try:
            inside(root, relative)  # a cache from elsewhere must not make us read or write outside it
        except ValueError as error:
            raise UserError(str(error).replace(str(root), url)) from error
    return files


# ---- train, cache verify/inspect: remote -> local mirror ----

def local_cache(location: str, log: Callable[[str], None] = print) -> str:
    """`location` itself if local; for a URL, the path of its local mirror (fetched first)."""
    return str(fetch(location, log)) if is_remote(location) else location


def fetch(url: str, log: Callable[[str], None] = print) -> Path:
    """Mirror the complete cache at `url` in ~/.cache/mlx-dpo/remote/<identity>, skipping files
    already there and matching; every shard's sha256 is checked against the manifest."""
    url = url.rstrip("/")
    fs, base = open_location(url)
    with _storage_errors(url):
        found = _read_manifest(fs, base, url)
    if found is None:
        raise UserError(f"{url}: not a complete mlx-dpo cache (no {MANIFEST_NAME}; run `mlx-dpo precompute --out {url}`)")
    manifest, raw = found
    mirror = user_cache_dir() / "remote" / manifest.identity
    downloaded, files = 0, cache_files(manifest, mirror, url)
    with _storage_errors(url):
        sizes = {s.path: s.bytes for split in manifest.splits.values() for s in split.shards}
        for relative, sha256 in files:
            local, remote, name = mirror / relative, f"{base}/{relative}", f"{url}/{relative}"
            size = _size(fs, remote)
            if sha256 is None:  # sidecars and rejects: not needed to train, copied when present
                if size is not None and not (local.is_file() and local.stat().st_size == size):
                    _download(fs, remote, local, None, name)
                    downloaded += 1
                continue
            if local.is_file() and local.stat().st_size == sizes[relative] and file_sha256(local) == sha256:
                continue
            if size is None:
                raise UserError(f"{name}: shard listed in the manifest is missing")
            if size != sizes[relative]:
                raise UserError(f"{name}: {size} bytes, manifest says {sizes[relative]} (truncated or replaced)")
            _download(fs, remote, local, sha256, name)
            downloaded += 1
        mirror.mkdir(parents=True, exist_ok=True)
        with atomic_path(mirror / MANIFEST_NAME) as tmp:  # last: the mirror is complete
            tmp.write_bytes(raw)
    log(f"Cache {manifest.identity[:12]} from {url} in {mirror} ({downloaded} of {len(files)} files downloaded)")
    return mirror


def _download(fs: pafs.FileSystem, remote: str, local: Path, sha256: str | None, name: str) -> None:
    """Copy via a temp file, hashing on the way: a bad object never lands in the mirror."""
    local.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(local) as tmp:
        with fs.open_input_stream(remote) as source, open(tmp, "wb") as target:
            while block := source.read(_CHUNK):
                digest.update(block)
                target.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UserError(f"{name}: sha256 differs from the manifest (the object was changed or corrupted)")


# ---- precompute: local staging -> remote ----

def precompute_remote(cfg, build: Callable, log: Callable[[str], None] = print) -> Manifest:
    """Run `build` (pipeline.precompute.precompute) for `cfg.out = URL` in a local staging directory,
    then upload the cache; reuse the remote cache when it has the same identity."""
    url = cfg.out.rstrip("/")
    if getattr(cfg, "num_shards", 1) > 1:
        raise UserError(f"{url}: --num-shards jobs write partial caches; give them local --out directories "
                        "and `mlx-dpo cache merge` them")
    fs, base = open_location(url)
    stage = staging_dir(url)
    with _storage_errors(url):
        found = _read_manifest(fs, base, url)
    # A copy of the remote manifest lets precompute compare identities without computing: it reuses
    # the cache or refuses other inputs. Without one, the staging directory is ours to clear or resume.
    # precompute places it under the staging lock, after finishing a local swap a killed run left.
    seeded = found is not None and not cfg.overwrite
    if cfg.overwrite and found is not None and not cfg.no_reuse:  # rebuilding in place: the old cache is
        cfg = dataclasses.replace(cfg, reuse_from=(url, *cfg.reuse_from))  # a source, fetched and verified
    try:
        manifest = build(dataclasses.replace(cfg, out=str(stage)), log=lambda line: log(line.replace(str(stage), url)),
                         staging=True, seed=found[1] if seeded else None)
    except UserError as error:  # "<staging>: holds a cache of other inputs" is about the URL
        raise UserError(error.message.replace(str(stage), url)) from error
    with _storage_errors(url):
        if seeded:
            missing = [f"{url}/{s.path}" for split in manifest.splits.values() for s in split.shards
                       if _size(fs, f"{base}/{s.path}") != s.bytes]
            if missing:
                raise UserError(f"{missing[0]}: missing or of another size than the manifest says; "
                                "rebuild the cache with --overwrite")
            return manifest
        if _rank() != 0:  # under mlx.launch the ranks share the staging directory; one uploads
            return manifest
        _upload(fs, base, stage, manifest, url, replace=found is not None, log=log)
    _keep_as_mirror(stage, manifest.identity)
    return manifest


def _rank() -> int:
    import mlx.core as mx  # here, not at import: the CLI loads mlx only for commands that need it

    return mx.distributed.init().rank()


def _upload(fs, base: str, stage: Path, manifest: Manifest, url: str, replace: bool, log) -> None:
    problems = check_cache(stage, manifest)  # sizes and row counts: never upload a broken cache
    if problems:
        raise UserError(f"{problems[0]} (in the staging directory of {url})")
    if replace:  # first: no reader may take the old manifest with new shards
        fs.delete_file(f"{base}/{MANIFEST_NAME}")
    total, listed = 0, [relative for relative, _ in cache_files(manifest, stage, url)] + [MANIFEST_NAME]
    for relative in listed:
        total += _put(fs, stage / relative, f"{base}/{relative}", f"{url}/{relative}")
    log(f"Uploaded {url} ({total / 1e6:.1f} MB, {MANIFEST_NAME} last)")
    _remove_unlisted(fs, base, url, set(listed), (stage / MANIFEST_NAME).read_bytes(), log)


def _remove_unlisted(fs, base: str, url: str, listed: set[str], manifest: bytes, log) -> None:
    """Delete the objects at `url` named like a cache's own files (shards.is_layout_name: manifest.json,
    rejects.jsonl, partial.json, train|valid/part-NNNNN.parquet|.rejects.jsonl, and the temp files of
    their local writes) that the just-uploaded manifest does not list: an older cache's, left by a
    rebuild with fewer shards or splits or by an upload cut short. As the local swap (rebuild.py), it
    never touches other names, deeper folders (another cache under URL/sub) or sibling prefixes (URL2).
    Runs after the manifest is in place, so no manifest of ours lists a deleted object; one cut short leaves
    objects no manifest lists (never read), which the next upload to `url` removes. One writer per URL at a
    time, as for a local cache: the manifest is re-read before every delete, so a second writer's upload that
    lands while we list stops the clean-up, but one landing between that read and the delete can lose a
    shard; its manifest then lists a missing object, which `cache verify` and `train` report (never a wrong
    value: every shard is checked against its sha256 on download)."""
    from .shards import is_layout_name  # here: the CLI imports this module at start

    def ours() -> bool:  # False once another writer's upload came after ours (or is under way): its own to clean
        try:
            with fs.open_input_stream(f"{base}/{MANIFEST_NAME}") as stream:
                return stream.read() == manifest
        except FileNotFoundError:  # an --overwrite deletes the manifest first
            return False

    try:
        if not ours():
            return
        stale = [name for name in _listing(fs, base) if is_layout_name(name) and name not in listed]
        for n, relative in enumerate(stale):
            if not ours():  # re-read before every delete: a writer that came while we listed keeps its files
                stale = stale[:n]
                break
            fs.delete_file(f"{base}/{relative}")
        for split in set(CACHE_SPLITS) - {relative.split("/")[0] for relative in listed if "/" in relative}:
            _remove_empty_folder(fs, f"{base}/{split}")  # also one a clean-up cut short left empty
    except OSError as error:
        reason = " ".join(str(error).split())
        raise UserError(f"{url}: {reason}: the new cache is uploaded and complete, but the old cache's "
                        "objects it does not list may remain; rerun with --overwrite") from error
    if stale:
        log(f"Removed {len(stale)} objects of an older cache from {url} ({stale[0]}, ...)")


def _remove_empty_folder(fs, folder: str) -> None:
    """A split folder the new cache lacks, as the local swap's rmdir: pyarrow's delete_file leaves an
    empty `folder/` marker object where it emptied one, removed here only while nothing is in it (the
    markers it leaves on folders that still hold objects name no file, and stay)."""
    if fs.get_file_info(folder).type == pafs.FileType.Directory:
        if not fs.get_file_info(pafs.FileSelector(folder)):
            fs.delete_dir(folder)


def _listing(fs, base: str) -> list[str]:
    """The objects (not folders) at `base` and in its split folders, relative to `base` ('/' is the
    boundary: `base` = b/c lists b/c/x, never b/c2/x)."""
    found = []
    for folder in (base, *(f"{base}/{split}" for split in CACHE_SPLITS)):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                found.append(info.path.removeprefix(f"{base}/"))
    return sorted(found)


def _put(fs: pafs.FileSystem, local: Path, remote: str, name: str) -> int:
    with open(local, "rb") as source, fs.open_output_stream(remote) as target:
        shutil.copyfileobj(source, target, _CHUNK)
    expected, size = local.stat().st_size, _size(fs, remote)
    if size != expected:
        raise UserError(f"{name}: the store holds {size} bytes after the upload, {expected} were sent")
    return size


def _keep_as_mirror(stage: Path, identity: str) -> None:
    """The uploaded staging directory becomes the local mirror, so training here downloads nothing."""
    (stage / LOCK_NAME).unlink(missing_ok=True)
    mirror = user_cache_dir() / "remote" / identity
    if mirror.exists():
        shutil.rmtree(stage)
    else:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(mirror)
