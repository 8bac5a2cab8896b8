"""Stage 1 end to end: load -> encode -> reference forward -> sharded Parquet + manifest.

Shards cover fixed ranges of input rows, so an interrupted run resumes from the last complete
shard. Every input row ends in a shard or in the rejects file, with its reason.
"""

import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from ..distributed import barrier, world
from ..errors import UserError
from ..models import checked_model_path, load_model, load_tokenizer, weights_hash
from ..schemas import (
    SCHEMA_VERSION,
    Manifest,
    describe_difference,
    identity_hash,
    read_manifest,
    ref_logps_schema,
    tokenizer_fingerprint,
)
from ..schemas.manifest import MANIFEST_NAME
from ..schemas.sequence import rejected_id_lists
from .config import PrecomputeConfig
from .load import load_splits
from .lock import LOCK_NAME, cache_lock
from .reference import score_rows
from .shards import finish, is_complete, owned, plan, reason_counts, write_partial
from .sources import EVAL_CACHE_SPLIT, encode_source, rows_hash, select_sources, settle_rejected_count
from .write import shard_identity, write_jsonl_atomic, write_shard


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


def _refuse_links(out: Path) -> None:
    """We write shards below `out`: a symbolic link there (a cache from elsewhere) would send them outside."""
    link = next((p for p in [*out.iterdir(), *out.glob("*/*")] if p.is_symlink()), None)
    if link is not None:
        raise UserError(f"{link}: a symbolic link inside the cache; a cache holds plain files only (remove it)")


def _remove_temp_files(out: Path) -> None:
    """Half-written files of a writer that died (we hold the lock, so no one else is writing)."""
    for tmp in [*out.glob(".*.tmp*"), *out.glob("*/.*.tmp*")]:
        tmp.unlink(missing_ok=True)


def _shard_table(scored: list[dict], identity: str, fields: dict, rejected_per_prompt: int) -> pa.Table:
    schema = ref_logps_schema(identity, fields, rejected_per_prompt)
    columns = {f.name: [row[f.name] for row in scored] for f in schema}
    return pa.table(columns, schema=schema)


def _score_into(rows: list[dict], model, pad_id: int, cfg: PrecomputeConfig, progress) -> None:
    """Add the reference columns to each encoded row, in place."""
    for batch, columns in score_rows(
        model, rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
        pad_id=pad_id, tokens_per_batch=cfg.tokens_per_batch,
    ):
        for j, i in enumerate(batch):
            rows[i].update({name: values[j].tolist() for name, values in columns.items()})
        progress.update(sum(_row_tokens(rows[i], cfg.max_length) for i in batch))


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
                f"would be rejected: {_format_reasons(reason_counts(r for _, r in rejected))})"
            )


def _row_tokens(row: dict, max_length: int | None) -> int:
    """Tokens the reference forward processes for a row (all 1+K sequences, after truncation)."""
    lengths = [len(row["prompt_ids"]) + len(ids) for ids in [row["chosen_ids"], *rejected_id_lists(row["rejected_ids"])]]
    return sum(lengths if max_length is None else [min(n, max_length) for n in lengths])


def precompute(cfg: PrecomputeConfig, log=print) -> Manifest:
    """Build (or reuse, or resume) the reference cache described by `cfg`; returns its manifest."""
    out = Path(cfg.out)
    sources, eval_name = select_sources(load_splits(cfg.data), cfg)

    model_path = checked_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    fields = {
        "schema_version": SCHEMA_VERSION,
        "reference_weights": weights_hash(model_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {name: rows_hash(source) for name, source in sources.items()},
        "options": {
            "max_length": cfg.max_length,
            "truncation_mode": cfg.truncation_mode,
            "splits": {"train": cfg.split, EVAL_CACHE_SPLIT: eval_name},
            "valid_fraction": cfg.valid_fraction if eval_name is None else 0.0,
            "fields": [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.system_field],
        },
    }
    identity = identity_hash(fields)
    out.mkdir(parents=True, exist_ok=True)
    workers, worker, group = _work_split(cfg)
    # One lock per cache directory: under mlx.launch rank 0 holds it for all ranks.
    with cache_lock(out) if worker == 0 or group is None else nullcontext():
        return _build(cfg, out, identity, fields, sources, tokenizer, model_path, log, workers, worker, group)


def _work_split(cfg: PrecomputeConfig):
    """(workers, this worker, mlx group or None): a --num-shards job, an mlx.launch rank, or everything."""
    group = world()
    if cfg.num_shards > 1 and group.size() > 1:
        raise UserError("use either mlx.launch or --num-shards/--shard-index, not both")
    if cfg.num_shards > 1:
        return cfg.num_shards, cfg.shard_index, None
    return (group.size(), group.rank(), group) if group.size() > 1 else (1, 0, None)


def _build(cfg, out, identity, fields, sources, tokenizer, model_path, log, workers, worker, group):
    """Everything that writes into `out`: this worker's shards, then (by the last one) the manifest."""
    main, existing = worker == 0 and cfg.num_shards == 1, None
    if worker == 0 or group is None:
        _refuse_links(out)
        if (existing := _check_existing(out, identity, fields, cfg.overwrite)) is None:
            _remove_temp_files(out)
    barrier(group)  # rank 0 has checked (and, with --overwrite, cleared) the directory
    if existing is None and group is not None and (out / MANIFEST_NAME).is_file():
        existing = read_manifest(out)  # rank 0 kept it, so it is this very cache
    if existing is not None:
        log(f"Reusing cache {out} (identity {identity[:12]}): same model, tokenizer, data and options; nothing to compute.")
        return existing

    encoded = {name: encode_source(tokenizer, source, cfg) for name, source in sources.items()}
    rejected_per_prompt = settle_rejected_count(encoded)
    if cfg.strict:
        _check_strict(encoded, cfg.data)
    rows_in = {name: len(rows) for name, rows in encoded.items()}
    tasks = plan(rows_in, cfg.rows_per_shard)
    mine = owned(tasks, workers, worker)
    started = time.perf_counter()
    _compute(mine, encoded, out, cfg, identity, fields, rejected_per_prompt, model_path, tokenizer, worker == 0)

    base = dict(identity=identity, identity_fields=fields, reference_model=cfg.model, max_length=cfg.max_length,
                truncation_mode=cfg.truncation_mode, rejected_per_prompt=rejected_per_prompt, rows_in=rows_in)
    if cfg.num_shards > 1:
        write_partial(out, base, cfg.rows_per_shard, workers, worker)
        log(f"Shard set {worker} of {workers} written to {out} ({len(mine)} of {len(tasks)} shards); "
            f"when all are done: mlx-dpo cache merge OUT {out} ...")
        return None
    barrier(group)  # every rank's shards are on disk
    if main:
        manifest = finish(out, tasks, base)
        log(_summary(manifest, time.perf_counter() - started))
    barrier(group)  # the manifest is written
    return manifest if main else read_manifest(out)


def _compute(tasks, encoded, out, cfg, identity, fields, rejected_per_prompt, model_path, tokenizer, show) -> None:
    """Score and write every task not already complete (resume), with a tokens/s progress bar."""
    todo = [t for t in tasks if not is_complete(t, out, identity)]
    chunks = {t: encoded[t.split][t.start : t.start + cfg.rows_per_shard] for t in todo}
    total = sum(_row_tokens(r, cfg.max_length) for chunk in chunks.values() for r in chunk if isinstance(r, dict))
    model = load_model(model_path, cfg.trust_remote_code) if todo else None  # none to do: never load it
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(total=total, unit="tok", unit_scale=True, desc="reference log-probs", smoothing=0.1,
              disable=not show or None) as progress:
        for task, chunk in chunks.items():
            rejects = [{"split": task.split, "index": task.start + i, "reason": r}
                       for i, r in enumerate(chunk) if isinstance(r, str)]
            rows = [r for r in chunk if isinstance(r, dict)]
            _score_into(rows, model, pad_id, cfg, progress)
            _check_finite(rows, task.split, cfg.model)
            task.path(out).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(rejects, task.rejects_path(out))  # before the shard, which marks completion
            write_shard(_shard_table(rows, identity, fields, rejected_per_prompt), task.path(out), out)


def _summary(manifest: Manifest, seconds: float) -> str:
    lines = []
    for name, s in manifest.splits.items():
        reasons = _format_reasons(s.rejected_by_reason)
        rejected = f"{s.rows_rejected:,} rejected" + (f": {reasons}" if reasons else "")
        lines.append(f"  {name}: {s.rows_in:,} rows: {s.rows_cached:,} cached, {rejected}")
    return f"Cache {manifest.identity[:12]} written in {seconds:.1f}s\n" + "\n".join(lines)
