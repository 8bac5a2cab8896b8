"""The command line: help that explains, bad flags refused, config precedence, every module imports."""

import importlib
import pkgutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mlx_dpo
from mlx_dpo.cli import build_config, cli
from mlx_dpo.errors import UserError
from mlx_dpo.trainer.config import TrainConfig


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("command, flags", [
    ("precompute", ["--model", "--data", "--out", "--max-length", "--split", "--truncation-mode", "--config"]),
    ("train", ["--cache", "--model", "--output", "--iters", "--batch-size", "--learning-rate", "--beta",
               "--label-smoothing", "--fine-tune-type", "--seed", "--config"]),
])
def test_help_lists_the_public_options(command, flags):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    for flag in flags:
        assert flag in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--cache", "c", "--model", "m", "--output", "o", "--beta", "-1"], "--beta must be positive"),
    (["train", "--cache", "c", "--model", "m", "--output", "o", "--label-smoothing", "0.5"], "--label-smoothing"),
    (["train", "--cache", "c", "--model", "m", "--output", "o", "--fine-tune-type", "qlora"], "--fine-tune-type"),
    (["train", "--cache", "c", "--model", "m"], "missing option --output"),
    (["train", "--iters", "ten"], "'ten' is not a valid integer"),
    (["precompute", "--model", "m", "--data", "d", "--out", "o", "--truncation-mode", "middle"], "--truncation-mode"),
    (["train", "--no-such-flag"], "No such option"),
])
def test_bad_flags_are_refused(args, message):
    result = invoke(*args)
    assert result.exit_code != 0 and message in result.output


def test_config_file_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("cache: from-file\nmodel: m\noutput: o\nbeta: 0.3\nlearning-rate: 0.001\n")
    cfg = build_config(TrainConfig, {"beta": 0.5, "cache": None}, str(config))
    assert (cfg.cache, cfg.beta, cfg.learning_rate, cfg.iters) == (("from-file",), 0.5, 0.001, 1000)
    config.write_text("betta: 0.3\n")
    with pytest.raises(UserError, match="unknown option 'betta'"):
        build_config(TrainConfig, {}, str(config))


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(mlx_dpo.__path__, "mlx_dpo.") if not m.name.endswith("__main__")]
    assert len(names) > 15
    for name in names:
        importlib.import_module(name)


def test_console_script_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_dpo", "train", "--cache", str(tmp_path), "--model", "m",
                             "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {tmp_path}: not a complete mlx-dpo cache (no manifest.json; run `mlx-dpo precompute`)"


MULTI_LINE = "Adapter at a contains incompatible tensors:\n  x.lora_a: shape (1,)\n\n  y.lora_a: shape (2,)\n"
ONE_LINE = "Adapter at a contains incompatible tensors: / x.lora_a: shape (1,) / y.lora_a: shape (2,)"


def test_a_library_message_is_one_line_on_every_error_path(monkeypatch, capsys):
    """Bad input (UserError), a rejected row's reason (RowRejected) and the console's last resort for
    anything else each show a library's many-line message on one line; a very long one is cut."""
    from mlx_dpo import cli as cli_module
    from mlx_dpo.errors import MAX_MESSAGE, one_line
    from mlx_dpo.pipeline.encode import RowRejected

    assert UserError(f"m: cannot load ({MULTI_LINE})").format_message() == f"m: cannot load ({ONE_LINE})"
    assert str(RowRejected(f"chat template error: {MULTI_LINE}")) == f"chat template error: {ONE_LINE}"
    long = one_line("x\n" * 1000)
    assert len(long) == MAX_MESSAGE and long.endswith("…") and "\n" not in long

    def internal_error(**_):
        raise ValueError(MULTI_LINE)

    monkeypatch.setattr(cli_module.cli, "main", internal_error)
    monkeypatch.setattr(sys, "argv", ["mlx-dpo", "cache", "ls"])
    with pytest.raises(SystemExit) as stopped:
        cli_module.main()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == f"Error: ValueError: {ONE_LINE} (run with --debug for the traceback)\n"
