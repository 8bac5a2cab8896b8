"""Stage 1 end to end: load -> encode -> reference forward -> sharded Parquet + manifest.

Shards cover fixed ranges of input rows, so an interrupted run resumes from the last complete
shard. Every input row ends in a shard or in the rejects file, with its reason.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from ..distributed import barrier, world
from ..errors import UserError
from ..models import checked_model_path, compute_dtype, load_tokenizer
from ..schemas import Manifest, describe_difference, identity_hash, read_manifest, ref_logps_schema
from ..schemas.atomic import atomic_path, make_dirs
from ..schemas.manifest import MANIFEST_NAME, refuse_links
from ..schemas.sequence import rejected_id_lists
from ..schemas.verify import check_cache
from .config import PrecomputeConfig
from .identity import identity_fields
from .load import load_splits
from .lock import cache_lock
from .rebuild import discard, finish_swap, prepare, rebuild_dir, swap_in
from .reference import load_reference, score_rows
from .reuse import fill_from, is_scored, source_caches
from .shards import (
    clear_layout,
    finish,
    is_complete,
    layout_files,
    owned,
    plan,
    reason_counts,
    remove_unplanned,
    temp_files,
    write_partial,
    write_sidecar,
)
from .sources import EVAL_CACHE_SPLIT, describe_inputs, encode_source, select_sources, settle_rejected_count
from .write import shard_identity, write_shard


def _check_existing(out: Path, identity: str, fields: dict, overwrite: bool, staging: bool) -> Manifest | None:
    """The manifest if `out` already holds this exact cache, whole; refuse any other cache, or with
    `overwrite` rebuild it (beside it, in rebuild.py's folder: the old cache stays until the new one is whole).
    A `staging` directory (remote.py) holds at most a copy of the remote manifest, and partial shards
    of other inputs are cleared rather than refused."""
    if overwrite:
        return None
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(out)
        except ValueError as error:  # also OldCache: "re-run precompute (with --overwrite)"
            raise UserError(f"{error}; use another --out or --overwrite") from error
        if manifest.identity != identity:
            diff = describe_difference(manifest.identity_fields, fields)
            raise UserError(f"{out}: holds a cache of other inputs ({diff}); use another --out or --overwrite")
        if not staging and (problems := check_cache(out, manifest, full=True)):  # reuse only what `cache verify` passes
            raise UserError(f"{problems[0]}: the cache is damaged; rebuild it with --overwrite")
        return manifest
    stale = [p for p in layout_files(out) if p.suffix == ".parquet" and shard_identity(p) != identity]
    if stale and staging:
        clear_layout(out)
    elif stale:
        raise UserError(f"{out}: holds partial shards of other inputs ({stale[0]}); use another --out or --overwrite")
    return None


def _seed_staging(out: Path, seed: bytes | None) -> None:
    """Place the remote manifest in the staging directory, or remove any there (a manifest left by a
    reuse or a local swap marks no shards here; complete shards are resumed past)."""
    if seed is None:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    else:
        with atomic_path(out / MANIFEST_NAME) as tmp:
            tmp.write_bytes(seed)


def _refuse_links(out: Path) -> None:
    """We write the cache's files below `out`: a symbolic link among them (a cache from elsewhere)
    would send them outside. The same check as every reader's (schemas.manifest.refuse_links)."""
    try:
        refuse_links(out)
    except ValueError as error:
        raise UserError(str(error)) from error


def _shard_table(scored: list[dict], identity: str, fields: dict, rejected_per_prompt: int, row_range: dict) -> pa.Table:
    schema = ref_logps_schema(identity, fields, rejected_per_prompt, row_range)
    columns = {f.name: [row[f.name] for row in scored] for f in schema}
    return pa.table(columns, schema=schema)


def _score_into(rows: list[dict], model, pad_id: int, cfg: PrecomputeConfig, progress) -> None:
    """Add the reference columns to each encoded row, in place."""
    for done, columns, tokens in score_rows(
        model, rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
        pad_id=pad_id, tokens_per_batch=cfg.tokens_per_batch,
    ):
        for j, i in enumerate(done):
            rows[i].update({name: values[j].tolist() for name, values in columns.items()})
        progress.update(tokens)


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


def _check_strict(encoded: dict[str, list], positions: dict[str, list[int]], data: str) -> None:
    for split, rows in encoded.items():
        rejected = [(positions[split][i], r) for i, r in enumerate(rows) if isinstance(r, str)]
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


@dataclass
class _Run:
    """What every step of one precompute needs."""
    cfg: PrecomputeConfig
    out: Path
    sources: dict
    tokenizer: object
    model_path: Path
    dtype: str
    fields: dict
    identity: str
    log: object


def precompute(cfg: PrecomputeConfig, log=print, *, staging: bool = False, seed: bytes | None = None) -> Manifest:
    """Build (or reuse, or resume) the reference cache described by `cfg`; returns its manifest.
    `staging`: `cfg.out` is remote.py's staging directory for an upload; `seed`: the remote manifest's
    bytes, placed there as its manifest (None: the staging directory keeps none)."""
    out = Path(cfg.out)
    sources, eval_name = select_sources(load_splits(cfg.data), cfg)
    model_path = checked_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    dtype = compute_dtype(model_path, cfg.dtype)
    fields = identity_fields(cfg, sources, eval_name, tokenizer, model_path, dtype)
    run = _Run(cfg, out, sources, tokenizer, model_path, dtype, fields, identity_hash(fields), log)
    input_splits = {"train": cfg.split, EVAL_CACHE_SPLIT: eval_name or cfg.split}
    make_dirs(out)  # durable: the folder entry survives a power cut with the files in it
    workers, worker, group = _work_split(cfg)
    # One lock per cache directory: under mlx.launch rank 0 holds it for all ranks.
    with cache_lock(out) if worker == 0 or group is None else nullcontext():
        return _build(run, input_splits, staging, workers, worker, group, seed)


def _work_split(cfg: PrecomputeConfig):
    """(workers, this worker, mlx group or None): a --num-shards job, an mlx.launch rank, or everything."""
    group = world()
    if cfg.num_shards > 1 and group.size() > 1:
        raise UserError("use either mlx.launch or --num-shards/--shard-index, not both")
    if cfg.num_shards > 1:
        return cfg.num_shards, cfg.shard_index, None
    return (group.size(), group.rank(), group) if group.size() > 1 else (1, 0, None)


def _build(run: _Run, input_splits: dict, staging: bool, workers: int, worker: int, group, seed: bytes | None):
    """Everything that writes into `out`: this worker's shards, then (by the last one) the manifest.
    With --overwrite they are written to `work` (pipeline/rebuild.py) and swapped in when complete."""
    cfg, out, identity = run.cfg, run.out, run.identity
    main, existing = worker == 0 and cfg.num_shards == 1, None
    work = rebuild_dir(out) if cfg.overwrite else out
    if worker == 0 or group is None:
        _refuse_links(out)
        finish_swap(out)  # a rebuild killed while swapping in: first finish it
        if staging:  # after the swap: the bucket, not a local rebuild never uploaded, says what OUT holds
            _seed_staging(out, seed)
        if (existing := _check_existing(out, identity, run.fields, cfg.overwrite, staging)) is None:
            for tmp in temp_files(out):  # of a writer that died: we hold the lock, no one else writes
                tmp.unlink(missing_ok=True)
        if cfg.overwrite:
            prepare(out, identity)
        else:
            discard(out)  # a failed rebuild's shards: this run does not resume them
    barrier(group)  # rank 0 has checked the directory
    if existing is None and not cfg.overwrite and group is not None and (out / MANIFEST_NAME).is_file():
        existing = read_manifest(out)  # rank 0 kept it, so it is this very cache
    if existing is not None:
        run.log(f"Reusing cache {out} (identity {identity[:12]}): same model, dtype, tokenizer, data and options; "
                "nothing to compute.")
        return existing

    results = {name: encode_source(run.tokenizer, source, cfg) for name, source in run.sources.items()}
    encoded = {name: rows for name, (rows, _) in results.items()}
    positions = {name: source.indices for name, source in run.sources.items()}
    rejected_per_prompt = settle_rejected_count(encoded)
    if cfg.strict:
        _check_strict(encoded, positions, cfg.data)
    rows_in = {name: len(rows) for name, rows in encoded.items()}
    tasks = plan(rows_in, cfg.rows_per_shard)
    started = time.perf_counter()
    # With --overwrite the old cache at `out` is a source too (verified first, as any other).
    reused = _reuse(run, encoded, rejected_per_prompt, staging, worker == 0)
    if worker == 0 or group is None:
        remove_unplanned(work, tasks)
    barrier(group)
    mine = owned(tasks, workers, worker)
    _compute(run, work, mine, encoded, positions, rejected_per_prompt, worker == 0)

    base = dict(identity=identity, identity_fields=run.fields, reference_model=cfg.model, max_length=cfg.max_length,
                truncation_mode=cfg.truncation_mode, rejected_per_prompt=rejected_per_prompt, rows_in=rows_in,
                input_splits={name: input_splits[name] for name in rows_in},
                inputs={name: notes.to_json() for name, (_, notes) in results.items()})
    if cfg.num_shards > 1:
        write_partial(work, base, cfg.rows_per_shard, workers, worker)
        if work != out:
            swap_in(out)
        run.log(f"Shard set {worker} of {workers} written to {out} ({len(mine)} of {len(tasks)} shards); "
                f"when all are done: mlx-dpo cache merge OUT {out} ...")
        return None
    barrier(group)  # every rank's shards are on disk
    if main:
        manifest = finish(work, tasks, base)
        if work != out:
            swap_in(out)
        run.log(_summary(manifest, time.perf_counter() - started, reused))
    barrier(group)  # the manifest is written
    return manifest if main else read_manifest(out)


def _reuse(run: _Run, encoded: dict, rejected_per_prompt: int, staging: bool, show: bool) -> dict:
    """Fill in the rows other caches of the same reference already scored (pipeline/reuse.py);
    per split, how many rows came from each source."""
    if run.cfg.no_reuse:
        return {}
    log = run.log if show else (lambda line: None)
    sources = source_caches(run.out, run.cfg.reuse_from, scan_parent=not staging, log=log)
    if run.cfg.overwrite and not staging and (run.out / MANIFEST_NAME).is_file():
        sources.insert(0, (str(run.out), run.out))  # the cache being rebuilt, which stays until the new one is whole
    return fill_from(sources, run.fields, encoded, rejected_per_prompt, log)


def _compute(run: _Run, out: Path, tasks, encoded: dict, positions: dict, rejected_per_prompt: int, show: bool) -> None:
    """Score and write into `out` every task not already complete (resume), with a tokens/s progress bar."""
    cfg = run.cfg
    todo = [t for t in tasks if not is_complete(t, out, run.identity)]
    chunks = {t: encoded[t.split][t.start : t.start + t.rows] for t in todo}
    misses = {t: [r for r in chunk if isinstance(r, dict) and not is_scored(r)] for t, chunk in chunks.items()}
    total = sum(_row_tokens(r, cfg.max_length) for rows in misses.values() for r in rows)
    # Nothing to score (all reused or resumed): never load the model.
    model = load_reference(run.model_path, cfg, run.dtype) if any(misses.values()) else None
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    with tqdm(total=total, unit="tok", unit_scale=True, desc="reference log-probs", smoothing=0.1,
              disable=not show or None) as progress:
        for task, chunk in chunks.items():
            rejects = [{"split": task.split, "index": positions[task.split][task.start + i], "reason": r}
                       for i, r in enumerate(chunk) if isinstance(r, str)]  # input positions, as `index` is
            rows = [r for r in chunk if isinstance(r, dict)]
            _score_into(misses[task], model, pad_id, cfg, progress)
            _check_finite(rows, task.split, cfg.model)
            write_sidecar(task, out, run.identity, rejects)  # before the shard, which marks completion
            table = _shard_table(rows, run.identity, run.fields, rejected_per_prompt, task.row_range())
            write_shard(table, task.path(out), out)


def _summary(manifest: Manifest, seconds: float, reused: dict) -> str:
    """Rows per split: cached and rejected; with rows reused, where the cached rows' values came from."""
    lines, any_reused = [], any(sum(c.values()) for c in reused.values())
    for name, s in manifest.splits.items():
        reasons = _format_reasons(s.rejected_by_reason)
        rejected = f"{s.rows_rejected:,} rejected" + (f": {reasons}" if reasons else "")
        if not any_reused:
            lines.append(f"  {name}: {s.rows_in:,} rows: {s.rows_cached:,} cached, {rejected}")
        else:
            counts = reused.get(name, {})
            sources = [f"{n:,} reused from {label}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1])]
            computed = f"{s.rows_cached - sum(counts.values()):,} computed"
            lines.append(f"  {name}: {s.rows_in:,} rows: " + ", ".join(sources + [computed])
                         + (f", {rejected}" if s.rows_rejected else ""))
        lines += describe_inputs(manifest.inputs, name)
    return f"Cache {manifest.identity[:12]} written in {seconds:.1f}s\n" + "\n".join(lines)
