"""`mlx-dpo cache ...`: commands that look after reference caches without running a model."""

from pathlib import Path

import click

from ..errors import UserError, one_line
from ..pipeline.remote import local_cache


@click.group("cache")
def cache():
    """Check and inspect reference caches written by `mlx-dpo precompute`."""


def cache_argument(ctx, param, value):
    """click callback for a CACHE argument: a URL becomes its local mirror (progress on stderr)."""
    return local_cache(value, log=lambda line: click.echo(line, err=True))


def read_cache_manifest(cache_dir: str):
    """The manifest of a complete cache, or a one-line UserError naming what is wrong."""
    from ..schemas import read_manifest

    try:
        return read_manifest(Path(cache_dir))
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error


@cache.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(), callback=cache_argument)
@click.option("--quick", is_flag=True, help="Only paths, sizes and row counts (no sha256, no values).")
def verify(cache_dir, quick):
    """Check a cache: every shard's sha256, size, row count, schema and identity, finite reference
    log-probs, and that every input row is cached or rejected exactly once."""
    from ..schemas.verify import check_cache

    manifest = read_cache_manifest(cache_dir)
    problems = check_cache(Path(cache_dir), manifest, full=not quick)
    for problem in problems:
        click.echo(one_line(problem), err=True)  # pyarrow's messages may span lines
    if problems:
        raise UserError(f"{cache_dir}: {len(problems)} problem(s); rebuild it with `mlx-dpo precompute --overwrite`")
    shards = sum(len(s.shards) for s in manifest.splits.values())
    rows = ", ".join(f"{name} {s.rows_cached:,} cached + {s.rows_rejected:,} rejected" for name, s in manifest.splits.items())
    checked = "paths, sizes and row counts" if quick else "sha256, schema, identity, values and row accounting"
    click.echo(f"{cache_dir}: OK ({manifest.identity[:12]}: {shards} shards; {rows}; checked {checked})")


@cache.command()
@click.argument("out", type=click.Path())
@click.argument("parts", nargs=-1, required=True, type=click.Path())
def merge(out, parts):
    """Combine the outputs of `precompute --num-shards N --shard-index i` jobs into one cache OUT,
    after checking that they are pieces of the same cache (same identity, all N present)."""
    from ..pipeline.merge import merge as merge_parts

    merge_parts(Path(out), [Path(p) for p in parts], log=click.echo)
