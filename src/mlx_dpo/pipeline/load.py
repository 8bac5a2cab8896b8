"""① Raw data -> rows of {prompt, chosen, rejected}, through datasets.load_dataset."""

from pathlib import Path

from ..errors import UserError
from .formats import Fields
from .jsontext import json_text_copies, parse_json_text
from .validate import check_data_files

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Split names datasets infers from file names, mapped to the names the cache uses.
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")


def load_splits(data: str) -> dict:
    """All splits of `data` (a file, a folder of split files, or a hub id) as a DatasetDict."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # our error is one line; datasets would log its own first
    check = check_data_files(data)
    path = Path(data)
    try:
        if path.is_file() and path.suffix.lower() not in _BUILDERS:
            raise UserError(f"{data}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
        if path.is_file() or path.is_dir():
            return _load_local(path, check)
        if path.suffix.lower() in _BUILDERS or "/" in data and not _looks_like_hub_id(data):
            raise UserError(f"{data}: no such file or directory")
        return datasets.load_dataset(data)
    except UserError:
        raise
    except (FileNotFoundError, DatasetNotFoundError) as error:
        raise UserError(f"{data}: dataset not found ({error})") from error
    except Exception as error:  # datasets wraps parse errors in several types
        if path.is_dir() and (mismatch := _files_disagree(path, _cache_dir(check.digest))):
            raise UserError(f"{data}: {mismatch}; the data files of a folder need the same columns, of the same types") from error
        cause = error.__cause__ or error
        raise UserError(f"{data}: could not read the data ({type(cause).__name__}: {cause})") from error


def _load_local(path: Path, check):
    """A local file or folder as a DatasetDict, datasets' conversion keyed by the content's sha256;
    CSV cells as text, and the object-valued fields of JSON files as written (jsontext.py)."""
    import datasets

    cache_dir = _cache_dir(check.digest)
    if path.is_file():
        builder, files, sep = _BUILDERS[path.suffix.lower()], {"train": [path]}, ","
    else:
        found = datasets.load_dataset_builder(str(path), cache_dir=cache_dir)
        builder, sep = found.name, getattr(found.config, "sep", ",")
        files = {split: [Path(f) for f in names] for split, names in found.config.data_files.items()}
        if builder not in ("json", "csv"):  # Parquet and others: typed by their writer
            return datasets.load_dataset(str(path), cache_dir=cache_dir)
    every_file = [f for names in files.values() for f in names]
    options = {"sep": sep, **_csv_as_text(every_file, sep)} if builder == "csv" else {}  # also .tsv
    objects = check.object_columns if builder == "json" else set()
    if objects:
        files = {split: json_text_copies(names, path, objects, Path(cache_dir)) for split, names in files.items()}
    data_files = {split: [str(f) for f in names] for split, names in files.items()}
    loaded = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **options)
    keep_text = {Fields.tools, Fields.chat_template_kwargs}
    return datasets.DatasetDict({split: parse_json_text(d, objects, keep_text) for split, d in loaded.items()})


def _csv_as_text(files: list[Path], sep: str = ",") -> dict:
    """load_dataset options that read CSV cells as written: pandas would type each 10,000-row chunk
    on its own (" 0.50" comes back as "0.5") and read "NA", "null", "nan" as missing. Every column is
    text, named as pandas names it when datasets reads the file (a byte-order mark stripped, blank lines
    before the header skipped, an empty name "Unnamed: 0"); only an empty cell is missing (null), as
    before. Raises ValueError if the files' columns differ: one schema for all would drop a column
    only some files have (the loader's error then names two files that differ)."""
    import datasets
    import pandas

    headers = [list(pandas.read_csv(file, sep=sep, nrows=0).columns) for file in files]
    if any(set(header) != set(headers[0]) for header in headers):
        raise ValueError("the CSV files have different columns")
    return {"features": datasets.Features({name: datasets.Value("string") for name in headers[0]}),
            "keep_default_na": False, "na_values": [""]}


def _cache_dir(digest: str) -> str:
    """datasets' cache folder for local data of this content: its own key for a converted local file is
    the path and mtime, so a file rewritten with the same mtime (cp -p, rsync -a, tar) would be read as
    its old rows. Same bytes, same folder: a rerun reuses the conversion."""
    import datasets

    return str(Path(datasets.config.HF_DATASETS_CACHE) / "mlx_dpo" / digest)


def _files_disagree(directory: Path, cache_dir: str) -> str | None:
    """Which two data files of `directory` have other columns (or column types), e.g. "train.jsonl and
    valid.jsonl have different columns (only valid.jsonl has prompt)"; None if they agree. datasets
    refuses such a folder with a many-line cast error naming no file. Reads each file alone."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(directory), cache_dir=cache_dir)
        files = [str(f) for split in builder.config.data_files.values() for f in split]
        features = {f: datasets.load_dataset(builder.name, data_files={"x": [f]}, split="x", cache_dir=cache_dir,
                                             **(_csv_as_text([Path(f)], builder.config.sep)
                                                if builder.name == "csv" else {})).features
                    for f in files}
    except Exception:  # not a disagreement we can name: the caller shows datasets' own message
        return None
    root = directory.resolve()
    names = {f: Path(f).relative_to(root).as_posix() if Path(f).is_relative_to(root) else f for f in files}
    first = files[0]
    for other in files[1:]:
        a, b = features[first], features[other]
        only = [f"only {names[f]} has {', '.join(sorted(set(x) - set(y)))}"
                for f, x, y in ((first, a, b), (other, b, a)) if set(x) - set(y)]
        if only:
            return f"{names[first]} and {names[other]} have different columns ({'; '.join(only)})"
        typed = [f"{c}: {_kind(a[c])} in {names[first]}, {_kind(b[c])} in {names[other]}" for c in a if a[c] != b[c]]
        if typed:
            return f"{names[first]} and {names[other]} have different column types ({'; '.join(typed)})"
    return None


def _kind(feature) -> str:
    """A column type in a few words: string, int64, list, object."""
    if isinstance(feature, dict):
        return "object"
    return getattr(feature, "dtype", None) or ("list" if type(feature).__name__ in ("List", "Sequence",
                                                                                  "LargeList") else type(feature).__name__)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def pick_split(splits, name: str, data: str):
    if name not in splits:
        raise UserError(f"{data}: no split {name!r} (splits: {', '.join(splits)})")
    return splits[name]


def find_eval_split(splits, train_split: str) -> str | None:
    return next((s for s in EVAL_SPLIT_NAMES if s in splits and s != train_split), None)
