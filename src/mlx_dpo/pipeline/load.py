"""① Raw data -> rows of {prompt, chosen, rejected}, through datasets.load_dataset."""

from pathlib import Path

from ..errors import UserError
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
    check_data_files(data)
    path = Path(data)
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"{data}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
            return datasets.load_dataset(builder, data_files={"train": str(path)})
        if path.is_dir():
            return datasets.load_dataset(str(path))
        if path.suffix.lower() in _BUILDERS or "/" in data and not _looks_like_hub_id(data):
            raise UserError(f"{data}: no such file or directory")
        return datasets.load_dataset(data)
    except UserError:
        raise
    except (FileNotFoundError, DatasetNotFoundError) as error:
        raise UserError(f"{data}: dataset not found ({error})") from error
    except Exception as error:  # datasets wraps parse errors in several types
        cause = error.__cause__ or error
        raise UserError(f"{data}: could not read the data ({type(cause).__name__}: {cause})") from error


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def pick_split(splits, name: str, data: str):
    if name not in splits:
        raise UserError(f"{data}: no split {name!r} (splits: {', '.join(splits)})")
    return splits[name]


def find_eval_split(splits, train_split: str) -> str | None:
    return next((s for s in EVAL_SPLIT_NAMES if s in splits and s != train_split), None)
