"""Commands that look at what is on disk, never at a model: `cache ls`, `cache inspect`, `report`."""

from pathlib import Path

import click

from ..errors import UserError
from .cache_cmds import cache_argument, read_cache_manifest


@click.command("ls")
@click.argument("root", default=".", type=click.Path(exists=True, file_okay=False))
def cache_ls(root):
    """List the caches under ROOT (default: here): identity, reference model, rows, size, date."""
    from .inspect_cache import list_caches

    click.echo(list_caches(root))


@click.command("inspect")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(), callback=cache_argument)
def cache_inspect(cache_dir):
    """Show what CACHE holds: identity, schema, rows per split, token-length percentiles, reference
    log-prob distribution and rejected rows by reason."""
    from ..schemas.verify import check_cache
    from .inspect_cache import inspect_cache

    manifest = read_cache_manifest(cache_dir)
    if problems := check_cache(Path(cache_dir), manifest):  # paths, sizes, Parquet footers: name the file
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    try:
        text = inspect_cache(Path(cache_dir), manifest)
    except ValueError as error:  # a manifest path through a symbolic link: never read outside the cache
        raise UserError(str(error)) from error
    click.echo(text)


@click.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), help="Also plot the runs into this PNG (needs matplotlib).")
@click.option("--pairs", is_flag=True, help="What training did to each held-out pair (eval_pairs.parquet): pairs "
              "preferred right before -> now, flips, most improved and worsened; --out plots margins before vs now.")
@click.option("--samples", is_flag=True, help="The policy's answers at the first and last evaluation (samples.jsonl, "
              "from train --eval-generate) beside the chosen and rejected answers.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Most improved and most worsened pairs shown with --pairs.")
def report(run_dirs, out, pairs, samples, top):
    """Compare runs: a table of the options that differ and the final metrics, and with --out a PNG of
    loss, rewards/accuracies, rewards/margins and chosen/rejected rewards against step (train and eval)."""
    from .report import report as run

    run(list(run_dirs), out, log=click.echo, pairs=pairs, samples=samples, top=top)
