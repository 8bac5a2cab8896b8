"""Config files and grouped --help: every example config builds its command's config, YAML values take
their field's type, and every option is listed under a section."""

import dataclasses
import importlib.util
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import build_config, cli
from mlx_dpo.cli import precompute as precompute_command
from mlx_dpo.cli import train as train_command
from mlx_dpo.cli.cli_help import GROUP_ORDER
from mlx_dpo.errors import UserError
from mlx_dpo.pipeline.config import PrecomputeConfig
from mlx_dpo.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
CONFIGS = {"precompute": PrecomputeConfig, "train": TrainConfig}


def test_there_are_examples_for_the_demo_and_a_real_model():
    assert {p.parent.name for p in EXAMPLES} >= {"demo", "qwen2.5-0.5b-ultrafeedback"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_builds_its_commands_config(path):
    cfg = build_config(CONFIGS[path.stem], {}, str(path))  # the file name says which command it is for
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert value is None or isinstance(value, bool) == (f.type is bool), (f.name, value)


@pytest.mark.parametrize("command, paths", [
    (train_command, ["--cache", ".demo/cache", "--model", ".demo/model", "--output", "runs/demo"]),
    (precompute_command, ["--model", ".demo/model", "--data", ".demo/data", "--out", ".demo/cache"]),
], ids=["train", "precompute"])
def test_demo_examples_are_what_make_train_runs(command, paths):
    config_cls = CONFIGS[command.name]
    makefile = (ROOT / "Makefile").read_text()
    variable = f"{command.name.upper()}_ARGS"
    make_args = next(line.split("?=", 1)[1] for line in makefile.splitlines() if line.startswith(variable))
    options = command.make_context(command.name, paths + shlex.split(make_args)).params
    names = {f.name for f in dataclasses.fields(config_cls)}
    from_make = build_config(config_cls, {k: v for k, v in options.items() if k in names}, None)
    assert build_config(config_cls, {}, str(ROOT / f"examples/demo/{command.name}.yaml")) == from_make


def test_yaml_values_take_their_fields_type(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("cache: c\nmodel: m\noutput: o\nlearning_rate: 1e-5\nbeta: 1\niters: '20'\n")
    cfg = build_config(TrainConfig, {}, str(config))  # YAML reads 1e-5 as a string and 1 as an int
    assert (cfg.learning_rate, cfg.beta, cfg.iters) == (1e-5, 1.0, 20)
    assert type(cfg.beta) is float
    config.write_text("cache: c\nmodel: m\noutput: o\niters: 1.5\n")
    with pytest.raises(UserError, match="run.yaml: iters: expected int, got 1.5"):
        build_config(TrainConfig, {}, str(config))


def test_a_repeatable_option_from_the_command_line_and_yaml(tmp_path):
    """--reuse-from is repeatable; in YAML a list (or one value); an option not given keeps the file's."""
    config = tmp_path / "pre.yaml"
    config.write_text("model: m\ndata: d\nout: o\nreuse_from: [a, s3://b/c]\n")
    assert build_config(PrecomputeConfig, {"reuse_from": ()}, str(config)).reuse_from == ("a", "s3://b/c")
    assert build_config(PrecomputeConfig, {"reuse_from": ("x",)}, str(config)).reuse_from == ("x",)
    config.write_text("model: m\ndata: d\nout: o\nreuse_from: a\n")
    assert build_config(PrecomputeConfig, {}, str(config)).reuse_from == ("a",)
    options = {p.name: p for p in precompute_command.params}
    assert options["reuse_from"].multiple and options["no_reuse"].is_flag


def test_ultrafeedback_rows_become_prompt_and_last_turns():
    spec = importlib.util.spec_from_file_location(
        "prepare_data", ROOT / "examples/qwen2.5-0.5b-ultrafeedback/prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    user = {"role": "user", "content": "2+2?"}
    row = {"chosen": [user, {"role": "assistant", "content": "4"}],
           "rejected": [user, {"role": "assistant", "content": "5"}], "score_chosen": 9.0}
    assert prepare.split_last_turn(row) == {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
                                            "rejected": [{"role": "assistant", "content": "5"}]}
    row["rejected"][0] = {"role": "user", "content": "3+3?"}
    with pytest.raises(ValueError, match="do not share the turns"):
        prepare.split_last_turn(row)


@pytest.mark.parametrize("config_cls", [PrecomputeConfig, TrainConfig])
def test_every_option_has_a_help_section(config_cls):
    ungrouped = [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("group") not in GROUP_ORDER]
    assert ungrouped == [], f"add metadata 'group' (one of {GROUP_ORDER}) to these fields"


@pytest.mark.parametrize("command, sections, first", [
    ("train", ["Data", "Model", "Loss", "Optimisation", "Output", "Other"], {"Loss": "--beta", "Output": "--output"}),
    ("precompute", ["Data", "Model", "Tokenization", "Output", "Other"], {"Tokenization": "--max-length"}),
])
def test_help_lists_options_by_section(command, sections, first):
    output = CliRunner().invoke(cli, [command, "--help"]).output
    headings = [line[: -len(" options:")] for line in output.splitlines() if line.endswith(" options:")]
    assert headings == sections
    lines = output.splitlines()
    for section, flag in first.items():
        start = lines.index(f"{section} options:")
        assert lines[start + 1].split()[0] == flag
