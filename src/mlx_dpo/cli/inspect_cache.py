"""What a reference cache holds: `mlx-dpo cache ls` (every cache under a folder) and `cache inspect`
(schema, identity, rows, token lengths, reference log-probs, rejects). Reads files only: no mlx."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..diagnostics import diagnostics_lines
from ..pipeline.sources import describe_inputs
from ..schemas import Manifest, read_manifest
from ..schemas.manifest import MANIFEST_NAME, find_caches, inside
from .tables import format_table, human_bytes

_SPARK = "▁▂▃▄▅▆▇█"


# ---------------------------------------------------------------- cache ls

def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_caches(root: str) -> str:
    """The `cache ls` table: one line per cache under `root`."""
    header = ["CACHE", "IDENTITY", "REFERENCE MODEL", "MAX LEN", "TRAIN", "VALID", "REJECTED", "SIZE", "CREATED"]
    rows = []
    for path, problem in find_caches(Path(root)):
        if problem is None:
            try:
                m = read_manifest(path)
            except ValueError as error:
                problem = f"unreadable manifest ({error})"
        if problem is not None:
            rows.append([str(path), problem] + [None] * (len(header) - 2))
            continue
        split_rows = {name: s.rows_cached for name, s in m.splits.items()}
        rows.append([
            str(path), m.identity[:12], m.reference_model, m.max_length, f"{split_rows.get('train', 0):,}",
            f"{split_rows['valid']:,}" if "valid" in split_rows else None,
            f"{sum(s.rows_rejected for s in m.splits.values()):,}", human_bytes(dir_bytes(path)),
            m.created_at[:16].replace("T", " "),
        ])
    if not rows:
        return f"No mlx-dpo caches under {root} (a cache is a folder with {MANIFEST_NAME}; see `mlx-dpo precompute`)."
    return format_table(header, rows, left=3)


# ---------------------------------------------------------------- column statistics

def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """Values of a scalar or list column and, for a list column (K rejected), each value's row."""
    if pa.types.is_list(column.type) and not pa.types.is_list(column.type.value_type):
        array = column.combine_chunks()
        return pc.list_flatten(array).to_numpy(), pc.list_parent_indices(array).to_numpy()
    return column.to_numpy(), None


def _lengths(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """Token counts of a list<int> column; for list<list<int>> (K rejected), of each inner list and its row."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type.value_type):
        return pc.list_value_length(pc.list_flatten(array)).to_numpy(), pc.list_parent_indices(array).to_numpy()
    return pc.list_value_length(array).to_numpy(), None


_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "n_chosen_tokens", "n_rejected_tokens")


def split_statistics(cache: Path, manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """Per-row arrays for one split, read one row group at a time (token ids are never all in memory)."""
    parts = defaultdict(list)
    for shard in manifest.splits[split].shards:
        handle = pq.ParquetFile(inside(cache, shard.path))
        present = [c for c in _TOKEN_COLUMNS + _LOGP_COLUMNS if c in handle.schema_arrow.names]
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group, columns=present)
            if set(_TOKEN_COLUMNS) <= set(present):
                _token_parts(table, parts)
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(present):
                _logp_parts(table, parts)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _token_parts(table: pa.Table, parts: dict) -> None:
    prompt, _ = _lengths(table["prompt_ids"])
    chosen, _ = _lengths(table["chosen_ids"])
    rejected, parent = _lengths(table["rejected_ids"])
    rows = np.arange(len(prompt)) if parent is None else parent
    longest = prompt + chosen  # the longest sequence of a row decides whether it is truncated
    np.maximum.at(longest, rows, prompt[rows] + rejected)
    for name, values in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected), ("longest sequence", longest)):
        parts[name + " tokens"].append(values)


def _logp_parts(table: pa.Table, parts: dict) -> None:
    chosen, _ = _flat(table["ref_chosen_logps"])
    rejected, parent = _flat(table["ref_rejected_logps"])
    n_chosen, _ = _flat(table["n_chosen_tokens"])
    n_rejected, _ = _flat(table["n_rejected_tokens"])
    paired_chosen = chosen if parent is None else chosen[parent]  # one chosen per rejected
    parts["ref_chosen_logps"].append(chosen)
    parts["ref_rejected_logps"].append(rejected)
    parts["ref chosen - rejected"].append(paired_chosen - rejected)
    parts["ref_chosen_logps / token"].append(chosen / np.maximum(n_chosen, 1))
    parts["ref_rejected_logps / token"].append(rejected / np.maximum(n_rejected, 1))


def sparkline(values: np.ndarray, bins: int = 16) -> str:
    """A one-line histogram between the 1st and 99th percentiles."""
    lo, hi = np.percentile(values, [1, 99])
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return ""
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return "".join(_SPARK[int(round(c / counts.max() * (len(_SPARK) - 1)))] for c in counts)


def _percentile_rows(stats: dict[str, np.ndarray], names: list[str], split: str, fmt: str, spark: bool):
    rows = []
    for name in names:
        values = stats.get(name)
        if values is None or len(values) == 0:
            continue
        finite = values[np.isfinite(values)]
        p = np.percentile(finite, [0, 5, 50, 95, 100]) if len(finite) else [np.nan] * 5
        row = [f"{split} {name}", *(format(v, fmt) for v in p)]
        rows.append(row + [f"{np.mean(finite):{fmt}}", sparkline(finite)] if spark else row)
    return rows


# ---------------------------------------------------------------- cache inspect

def _identity_lines(m: Manifest, cache: Path) -> list[str]:
    fields = m.identity_fields
    opts = fields.get("options", {})
    data = ", ".join(f"{k} {v[:12]}" for k, v in fields.get("data", {}).items())
    sources = ", ".join(f"{k} <- {v}" for k, v in opts.get("splits", {}).items() if v)
    shards = sum(len(s.shards) for s in m.splits.values())
    return [
        f"Cache {cache}",
        f"  identity           {m.identity[:12]}  (schema v{m.schema_version}, mlx-dpo {m.mlx_dpo_version or '?'}, created {m.created_at or '?'})",
        f"  reference model    {m.reference_model}  (weights {str(fields.get('reference_weights'))[:12]}, "
        f"computed in {fields.get('dtype', '?')})",
        f"  tokenizer          {str(fields.get('tokenizer'))[:12]}",
        f"  data               {data}  (splits {sources})",
        f"  options            max_length {m.max_length}, truncation {m.truncation_mode}",
        f"  files              {shards} shards, {human_bytes(dir_bytes(cache))}",
    ]


def _schema_lines(cache: Path, m: Manifest) -> list[str]:
    first = next((inside(cache, s.path) for split in m.splits.values() for s in split.shards), None)
    if first is None or not first.is_file():
        return ["Schema: no shard to read"]
    schema = pq.read_schema(first)
    rows = [[f.name, str(f.type).replace("element: ", "")] for f in schema]
    return [f"Schema ({first.relative_to(cache)})", format_table(["column", "type"], rows, indent="  ", left=2)]


def _rows_lines(m: Manifest) -> list[str]:
    rows = [[name, f"{s.rows_in:,}", f"{s.rows_cached:,}", f"{s.rows_rejected:,}", f"{s.completion_tokens:,}"]
            for name, s in m.splits.items()]
    notes = [line for name in m.splits for line in describe_inputs(m.inputs, name, indent=f"  {name}: ")]
    return ["Rows", format_table(["split", "input", "cached", "rejected", "completion tokens"], rows, indent="  "), *notes]


def _rejects_lines(cache: Path, m: Manifest, examples: int = 3) -> list[str]:
    counts = Counter({(split, reason): n for split, s in m.splits.items() for reason, n in s.rejected_by_reason.items()})
    if not counts:
        return ["Rejected rows: none"]
    seen = defaultdict(list)
    path = inside(cache, m.rejects_file or "rejects.jsonl")
    if path.is_file():
        with open(path) as handle:
            for line in handle:
                record = json.loads(line)
                key = (record["split"], record["reason"].split(" (")[0])
                if len(seen[key]) < examples:
                    seen[key].append(str(record["index"]))
    rows = [[split, reason, f"{n:,}", ", ".join(seen[(split, reason)])] for (split, reason), n in counts.most_common()]
    return [f"Rejected rows by reason ({path.name})",
            format_table(["split", "reason", "rows", "first input rows"], rows, indent="  ", left=2)]


_TOKEN_STATS = ["prompt tokens", "chosen tokens", "rejected tokens", "longest sequence tokens"]
_LOGP_STATS = ["ref_chosen_logps", "ref_rejected_logps", "ref chosen - rejected",
               "ref_chosen_logps / token", "ref_rejected_logps / token"]
_PERCENTILES = ["min", "p5", "p50", "p95", "max"]


def _distribution_lines(cache: Path, m: Manifest) -> list[str]:
    token_rows, token_notes, logp_rows, logp_notes = [], [], [], []
    for split, info in m.splits.items():
        if info.rows_cached == 0:
            continue
        stats = split_statistics(cache, m, split)
        token_rows += _percentile_rows(stats, _TOKEN_STATS, split, ".0f", False)
        logp_rows += _percentile_rows(stats, _LOGP_STATS, split, ".2f", True)
        if m.max_length is not None and "longest sequence tokens" in stats:
            over = int(np.sum(stats["longest sequence tokens"] > m.max_length))
            token_notes.append(f"  {split}: {over:,} of {info.rows_cached:,} pairs are longer than max_length "
                               f"{m.max_length} and are truncated ({m.truncation_mode})")
        if len(stats.get("ref chosen - rejected", [])):
            share = float(np.mean(stats["ref chosen - rejected"] > 0))
            logp_notes.append(f"  {split}: the reference already prefers chosen in {share:.1%} of pairs")
    return [
        "Token lengths before truncation",
        format_table(["split column"] + _PERCENTILES, token_rows, indent="  "), *token_notes, "",
        "Reference log-probs (sums over the scored completion tokens)",
        format_table(["split column"] + _PERCENTILES + ["mean", "p1..p99 histogram"], logp_rows, indent="  "),
        *logp_notes, "",
    ]


def inspect_cache(cache: Path, m: Manifest) -> str:
    """The `cache inspect` report for the cache in `cache` with manifest `m`, as text."""
    sections = [_identity_lines(m, cache), _schema_lines(cache, m), _rows_lines(m)]
    lines = [line for section in sections for line in section + [""]]
    return "\n".join(lines + _distribution_lines(cache, m) + diagnostics_lines(cache, m) + _rejects_lines(cache, m))
