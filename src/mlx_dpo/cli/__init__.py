"""`mlx-dpo`: precompute a reference cache once, then train any number of runs from it.

Each command is thin: options -> config dataclass (command line > --config YAML > defaults) -> call.
"""

import dataclasses
import sys
import traceback
import types
import typing
from pathlib import Path

import click
import yaml

from .. import __version__
from ..errors import UserError, one_line
from ..pipeline.config import PrecomputeConfig
from ..pipeline.remote import is_remote, local_cache, precompute_remote
from ..process import keep_torch_out_of_transformers
from ..trainer.config import TrainConfig
from .cache_cmds import cache
from .cli_help import GroupedCommand, GroupedOption
from .look_cmds import cache_inspect, cache_ls
from .look_cmds import report as report_command  # not `report`: that name is the submodule report.py


def _click_type(annotation):
    if typing.get_origin(annotation) is types.UnionType:  # e.g. int | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:  # tuple[str, ...]: a repeatable option
        annotation = typing.get_args(annotation)[0]
    return {int: int, float: float, str: str, bool: bool}[annotation]


def config_options(config_cls):
    """One click option per dataclass field, help text and --help section from the field's metadata.
    Defaults are left to the dataclass so we can tell which options the user actually gave."""

    def decorate(command):
        for f in reversed(dataclasses.fields(config_cls)):
            kind = _click_type(f.type)
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING
            default = "" if required else f" [default: {f.metadata.get('shown_default', f.default)}]"
            help_text = f.metadata.get("help", "") + (" [required]" if required else default)
            shared = dict(default=None, help=help_text, cls=GroupedOption, group=f.metadata.get("group"))
            if kind is bool:
                command = click.option(flag, f.name, is_flag=True, **shared)(command)
            else:
                multiple = typing.get_origin(f.type) is tuple
                command = click.option(flag, f.name, type=kind, multiple=multiple, **shared)(command)
        return command

    return decorate


def _file_value(f: dataclasses.Field, value, where: str):
    """A YAML value as its field's type, as on the command line: YAML reads 1e-5 (no dot) as a string."""
    kind = _click_type(f.type)
    if typing.get_origin(f.type) is tuple:  # a list in the file, or one value
        return tuple(_typed(kind, v, where) for v in (value if isinstance(value, list) else [value]))
    return _typed(kind, value, where)


def _typed(kind: type, value, where: str):
    if value is None or type(value) is kind:
        return value
    if kind is str and type(value) is bool:  # YAML 1.1 reads an unquoted on/off (a switch's words) as a boolean
        return "on" if value else "off"
    if kind in (float, str) and type(value) in (int, float):  # 1 for 1.0; a number where text is expected
        return kind(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")


def build_config(config_cls, cli_values: dict, config_file: str | None):
    """command line > YAML file > dataclass defaults (mlx-lm's precedence)."""
    values = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{config_file}: cannot read config ({error})") from error
        if not isinstance(loaded, dict):
            raise UserError(f"{config_file}: a config must be a mapping of option: value")
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise UserError(f"{config_file}: unknown option {key!r}")
            values[name] = _file_value(fields[name], value, f"{config_file}: {key}")
    values.update({k: v for k, v in cli_values.items() if v is not None and v != ()})  # () : not given
    missing = [f.name for f in dataclasses.fields(config_cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise UserError("missing option " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return config_cls(**values)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mlx-dpo")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug):
    """DPO fine-tuning on MLX from a precomputed reference cache.

    \b
    1. mlx-dpo precompute --model M --data D --out CACHE   (runs the reference model once)
    2. mlx-dpo train --cache CACHE --model M --output RUN  (any number of runs share CACHE)
    """


@cli.command(cls=GroupedCommand)
@config_options(PrecomputeConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (command line wins).")
def precompute(config_file, **options):
    """Run the reference model once and write its log-probs to a Parquet cache.

    Rows whose token ids cannot be trained on go to CACHE/rejects.jsonl with a reason. Re-running
    with the same model, tokenizer, data and options reuses the cache; an interrupted run resumes
    from its last complete shard.
    """
    from ..pipeline.precompute import precompute as run

    cfg = build_config(PrecomputeConfig, options, config_file)
    if is_remote(cfg.out):  # built in a local staging directory, then uploaded
        precompute_remote(cfg, run, log=click.echo)
    else:
        run(cfg, log=click.echo)


@cli.command(cls=GroupedCommand)
@config_options(TrainConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (command line wins).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in --output.",
              cls=GroupedOption, group="Output")
@click.option("--resume", is_flag=True, cls=GroupedOption, group="Output",
              help="Continue the run in --output from its last checkpoint: weights, optimizer state, "
                   "learning-rate schedule, data position and RNG, so the losses are those of an uninterrupted run.")
@click.option("--stop-after", type=click.IntRange(min=1), cls=GroupedOption, group="Output",
              help="Stop after this step as if interrupted (the schedule still spans --iters); continue with --resume.")
@click.option("--verify-cache", is_flag=True, cls=GroupedOption, group="Data",
              help="Check every shard's sha256, schema and values first (sizes and row counts are always checked).")
def train(config_file, overwrite, resume, stop_after, verify_cache, **options):
    """Train a policy with DPO against a reference cache (the reference model is never loaded).

    Writes OUTPUT/metrics.jsonl (TRL's metric names), OUTPUT/adapters.safetensors with
    adapter_config.json (load with `mlx_lm.generate --adapter-path OUTPUT`), and config.yaml.
    """
    from ..trainer.run import run_training

    cfg = build_config(TrainConfig, options, config_file)
    cfg = dataclasses.replace(cfg, cache=tuple(local_cache(c, log=click.echo) for c in cfg.cache))  # a URL: its local mirror
    run_training(cfg, overwrite=overwrite, log=click.echo,
                 resume=resume, stop_after=stop_after, verify_cache=verify_cache)


cli.add_command(cache)
cache.add_command(cache_ls)
cache.add_command(cache_inspect)
cli.add_command(report_command)


def main() -> None:
    """Console entry: one-line errors and a non-zero exit; tracebacks only with --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        keep_torch_out_of_transformers(sys.argv[1:])  # else ~250 MB resident for nothing (mlx_dpo.process)
        cli.main(standalone_mode=False)
    except click.ClickException as error:
        if debug and isinstance(error, UserError):
            traceback.print_exc()
        error.show()
        sys.exit(error.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as error:
        if debug:
            raise
        click.echo(f"Error: {one_line(f'{type(error).__name__}: {error}')} (run with --debug for the traceback)", err=True)
        sys.exit(1)

