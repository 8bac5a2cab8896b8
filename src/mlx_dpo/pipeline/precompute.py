"""Stage 1 end to end: load -> encode -> reference forward -> sharded Parquet + manifest.

Shards cover fixed ranges of input rows, so an interrupted run resumes from the last complete
shard. Every input row ends in a shard or in the rejects file, with its reason.
"""

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from .. import __version__
from ..errors import UserError
from ..models import checked_model_path, load_model, load_tokenizer, weights_hash
from ..schemas import (
    SCHEMA_VERSION,
    Manifest,
    SplitInfo,
    describe_difference,
    identity_hash,
    read_manifest,
    ref_logps_schema,
    tokenizer_fingerprint,
    write_json_atomic,
)
from ..schemas.manifest import MANIFEST_NAME
from .config import PrecomputeConfig
from .encode import RowRejected, check_fits, encode_row
from .load import check_columns, find_eval_split, load_splits, pick_split
from .lock import LOCK_NAME, cache_lock
from .reference import score_rows
from .write import completion_tokens, shard_identity, shard_info, write_jsonl_atomic, write_shard

EVAL_CACHE_SPLIT = "valid"


def _rows_hash(dataset) -> str:
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def _encode_split(tokenizer, dataset, cfg: PrecomputeConfig) -> list[dict | str]:
    """Per input row: the encoded row dict, or the reason it was rejected (a string)."""
    out = []
    for index, row in enumerate(dataset):
        try:
            encoded = encode_row(tokenizer, row)
            check_fits(encoded, cfg.max_length, cfg.truncation_mode)
            out.append({"index": index, **vars(encoded)})
        except RowRejected as reason:
            out.append(str(reason))
    return out


def _check_existing(out: Path, identity: str, fields: dict, overwrite: bool) -> Manifest | None:
    """The manifest if `out` already holds this exact cache; refuse (or clear) any other cache."""
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        if manifest.identity == identity:
            return manifest
        if not overwrite:
            diff = describe_difference(manifest.identity_fields, fields)
            raise UserError(f"{out}: holds a cache of other inputs ({diff}); use another --out or --overwrite")
    stale = [p for p in out.glob("*/part-*.parquet") if shard_identity(p) != identity]
    if stale and not overwrite:
        raise UserError(f"{out}: holds partial shards of other inputs ({stale[0]}); use another --out or --overwrite")
    if overwrite and (stale or (out / MANIFEST_NAME).exists()):
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: from here on no reader takes it as complete
        for child in out.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    return None


def _remove_temp_files(out: Path) -> None:
    """Half-written files of a writer that died (we hold the lock, so no one else is writing)."""
    for tmp in [*out.glob(".*.tmp*"), *out.glob("*/.*.tmp*")]:
        tmp.unlink(missing_ok=True)


def _shard_table(scored: list[dict], identity: str, fields: dict) -> pa.Table:
    schema = ref_logps_schema(identity, fields)
    columns = {f.name: [row[f.name] for row in scored] for f in schema}
    return pa.table(columns, schema=schema)


def _score_into(rows: list[dict], model, pad_id: int, cfg: PrecomputeConfig, progress) -> None:
    """Add the reference columns to each encoded row, in place."""
    for batch, chosen, rejected, n_chosen, n_rejected in score_rows(
        model, rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
        pad_id=pad_id, tokens_per_batch=cfg.tokens_per_batch,
    ):
        for j, i in enumerate(batch):
            rows[i].update(
                ref_chosen_logps=float(chosen[j]), ref_rejected_logps=float(rejected[j]),
                n_chosen_tokens=int(n_chosen[j]), n_rejected_tokens=int(n_rejected[j]),
            )
        progress.update(sum(_row_tokens(rows[i], cfg.max_length) for i in batch))


def _precompute_split(get_model, pad_id, encoded, split, out, cfg, identity, fields, progress):
    """Write one split's shards (skipping complete ones); returns (SplitInfo, reject records)."""
    rejects, infos = [], []
    for shard_no, start in enumerate(range(0, max(len(encoded), 1), cfg.rows_per_shard)):
        part = out / split / f"part-{shard_no:05d}.parquet"
        rejects_part = part.with_suffix(".rejects.jsonl")
        chunk = encoded[start : start + cfg.rows_per_shard]
        chunk_rejects = [
            {"split": split, "index": start + i, "reason": r} for i, r in enumerate(chunk) if isinstance(r, str)
        ]
        rows = [r for r in chunk if isinstance(r, dict)]
        if part.exists() and rejects_part.exists() and shard_identity(part) == identity:
            progress.update(sum(_row_tokens(r, cfg.max_length) for r in rows))  # complete: resume past it
            infos.append(shard_info(part, out))
        else:
            _score_into(rows, get_model(), pad_id, cfg, progress)
            _check_finite(rows, split, cfg.model)
            part.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(chunk_rejects, rejects_part)  # before the shard, which marks completion
            infos.append(write_shard(_shard_table(rows, identity, fields), part, out))
        rejects += chunk_rejects
    info = SplitInfo(
        rows_in=len(encoded),
        rows_cached=sum(s.rows for s in infos),
        rows_rejected=len(rejects),
        rejected_by_reason=dict(_reason_counts(r["reason"] for r in rejects)),
        completion_tokens=sum(completion_tokens(out / s.path) for s in infos),
        shards=infos,
    )
    return info, rejects


def _check_finite(rows: list[dict], split: str, model: str) -> None:
    """A NaN reference value would surface much later as a NaN loss; stop here instead."""
    for row in rows:
        for field in ("ref_chosen_logps", "ref_rejected_logps"):
            values = row[field] if isinstance(row[field], list) else [row[field]]
            if not all(math.isfinite(v) for v in values):
                raise UserError(
                    f"{model}: non-finite reference log-prob ({field} = {row[field]}) for {split} row "
                    f"{row['index']}; the model's weights or dtype overflow (nothing was cached for this shard)"
                )


def _reason_counts(reasons) -> Counter:
    return Counter(reason.split(" (")[0] for reason in reasons)  # "prompt fills max_length (40 >= 32)"


def _format_reasons(counts: dict) -> str:
    """'4 empty chosen, 2 chosen identical to rejected', most frequent first."""
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _check_strict(encoded: dict[str, list], data: str) -> None:
    for split, rows in encoded.items():
        rejected = [(i, r) for i, r in enumerate(rows) if isinstance(r, str)]
        if rejected:
            index, reason = rejected[0]
            raise UserError(
                f"{data} [{split}] row {index}: {reason} (--strict: {len(rejected):,} of {len(rows):,} rows "
                f"would be rejected: {_format_reasons(_reason_counts(r for _, r in rejected))})"
            )


def _row_tokens(row: dict, max_length: int | None) -> int:
    """Tokens the reference forward processes for a row (both sequences, after truncation)."""
    chosen = len(row["prompt_ids"]) + len(row["chosen_ids"])
    rejected = len(row["prompt_ids"]) + len(row["rejected_ids"])
    if max_length is not None:
        chosen, rejected = min(chosen, max_length), min(rejected, max_length)
    return chosen + rejected


def precompute(cfg: PrecomputeConfig, log=print) -> Manifest:
    """Build (or reuse, or resume) the reference cache described by `cfg`; returns its manifest."""
    out = Path(cfg.out)
    splits = load_splits(cfg.data)
    sources = {"train": pick_split(splits, cfg.split, cfg.data)}
    if (eval_name := find_eval_split(splits, cfg.split)) is not None:
        sources[EVAL_CACHE_SPLIT] = splits[eval_name]
    for name, dataset in sources.items():
        check_columns(dataset, cfg.data, name)
        if len(dataset) == 0:
            raise UserError(f"{cfg.data} [{name}]: the split has no rows")

    model_path = checked_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    fields = {
        "schema_version": SCHEMA_VERSION,
        "reference_weights": weights_hash(model_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {name: _rows_hash(ds) for name, ds in sources.items()},
        "options": {
            "max_length": cfg.max_length,
            "truncation_mode": cfg.truncation_mode,
            "splits": {"train": cfg.split, EVAL_CACHE_SPLIT: eval_name},
            "fields": ["prompt", "chosen", "rejected"],
        },
    }
    identity = identity_hash(fields)
    out.mkdir(parents=True, exist_ok=True)
    with cache_lock(out):
        return _build(cfg, out, identity, fields, sources, tokenizer, model_path, log)


def _build(cfg, out, identity, fields, sources, tokenizer, model_path, log) -> Manifest:
    """Everything that writes into `out`; runs under its lock."""
    if (existing := _check_existing(out, identity, fields, cfg.overwrite)) is not None:
        log(f"Reusing cache {out} (identity {identity[:12]}): same model, tokenizer, data and options; nothing to compute.")
        return existing
    _remove_temp_files(out)

    encoded = {name: _encode_split(tokenizer, ds, cfg) for name, ds in sources.items()}
    if cfg.strict:
        _check_strict(encoded, cfg.data)
    total = sum(_row_tokens(r, cfg.max_length) for rows in encoded.values() for r in rows if isinstance(r, dict))
    model_box = []

    def get_model():  # loaded only if some shard still needs computing
        if not model_box:
            model_box.append(load_model(model_path, cfg.trust_remote_code))
        return model_box[0]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    infos, rejects = {}, []
    with tqdm(total=total, unit="tok", unit_scale=True, desc="reference log-probs", smoothing=0.1) as progress:
        for name, rows in encoded.items():
            infos[name], split_rejects = _precompute_split(
                get_model, pad_id, rows, name, out, cfg, identity, fields, progress
            )
            rejects += split_rejects
    write_jsonl_atomic(rejects, out / "rejects.jsonl")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, identity=identity, identity_fields=fields,
        reference_model=cfg.model, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
        splits=infos, rejects_file="rejects.jsonl",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), mlx_dpo_version=__version__,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())  # last: marks the cache complete
    log(_summary(manifest, time.perf_counter() - started))
    return manifest


def _summary(manifest: Manifest, seconds: float) -> str:
    lines = []
    for name, s in manifest.splits.items():
        reasons = _format_reasons(s.rejected_by_reason)
        rejected = f"{s.rows_rejected:,} rejected" + (f": {reasons}" if reasons else "")
        lines.append(f"  {name}: {s.rows_in:,} rows: {s.rows_cached:,} cached, {rejected}")
    return f"Cache {manifest.identity[:12]} written in {seconds:.1f}s\n" + "\n".join(lines)
