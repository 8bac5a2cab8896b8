"""`mlx-dpo report`: the comparison table, the PNG, and the errors, on hand-written run directories."""

import json
import sys

import pytest
import yaml
from click.testing import CliRunner

from mlx_dpo.cli import cli
from mlx_dpo.cli.report import PANELS, load_run, plot_runs


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_run(path, beta, cache="aa" * 32, final_loss=0.2):
    """Eval at steps 0 and 20, train at 1, 10 and 20; the loss falls from ln 2 to `final_loss`."""
    path.mkdir(parents=True)
    config = {"cache": "c", "model": "m", "output": str(path), "beta": beta, "learning_rate": 1e-4, "seed": 0,
              "cache_identity": cache}
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metric = lambda loss, acc, margin: {"loss": loss, "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,  # noqa: E731
                                        "rewards/accuracies": acc, "rewards/margins": margin, "ntoks": 100}
    train = {"tokens_per_sec": 1000.0, "peak_memory_gb": 0.5, "learning_rate": 1e-4, "grad_norm": 1.0}
    records = [
        {"step": 0, "split": "eval", **metric(0.6931, 0.5, 0.0)},
        {"step": 1, "split": "train", **metric(0.6931, 0.4, 0.0), **train},
        {"step": 10, "split": "train", **metric(0.5, 0.8, 0.5), **train, "tokens_per_sec": 3000.0},
        {"step": 20, "split": "train", **metric(final_loss, 1.0, 1.5), **train, "peak_memory_gb": 0.75},
        {"step": 20, "split": "eval", **metric(final_loss + 0.01, 0.9, 1.25)},
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def columns(output, run):
    return next(line.split() for line in output.splitlines() if line.startswith(run + " "))


def test_table_compares_the_options_that_differ(tmp_path):
    a, b = make_run(tmp_path / "beta0.1", 0.1), make_run(tmp_path / "beta0.5", 0.5, final_loss=0.05)
    result = invoke("report", a, b)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header[:4] == ["run", "cache", "beta", "steps"]  # learning_rate and seed are equal: not shown
    # run, cache, beta, steps, train loss, eval loss first -> last, eval acc, eval margin, median tok/s, peak GB
    assert columns(result.output, "beta0.1") == ["beta0.1", "aaaaaaaaaaaa", "0.1", "20", "0.2000", "0.6931", "->",
                                                 "0.2100", "0.900", "1.2500", "1,000", "0.75"]
    assert columns(result.output, "beta0.5")[2:5] == ["0.5", "20", "0.0500"]
    assert "different caches" not in result.output


def test_runs_from_different_caches_are_flagged(tmp_path):
    a, b = make_run(tmp_path / "x", 0.1), make_run(tmp_path / "y", 0.1, cache="bb" * 32)
    result = invoke("report", a, b)
    assert result.exit_code == 0 and "these runs use 2 different caches" in result.output


def test_png_has_every_panel_with_train_and_eval_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [load_run(make_run(tmp_path / name, beta)) for name, beta in (("a", 0.1), ("b", 0.5))]
    out = tmp_path / "report.png"
    figure = plot_runs(runs, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(PANELS)
    for ax in panels:
        assert len(ax.lines) == 4  # 2 runs x (train, eval)
    loss = panels[0].lines
    assert list(loss[0].get_xdata()) == [1, 10, 20] and list(loss[1].get_xdata()) == [0, 20]
    legend = [t.get_text() for t in figure.axes[-1].get_legend().get_texts()]
    assert legend[:2] == ["a beta=0.1", "b beta=0.5"]


def test_report_command_writes_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke("report", make_run(tmp_path / "a", 0.1), "--out", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    assert f"Wrote {tmp_path / 'r.png'}" in result.output and (tmp_path / "r.png").stat().st_size > 0


def test_without_matplotlib_the_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = invoke("report", make_run(tmp_path / "a", 0.1), "--out", tmp_path / "r.png")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: report --out needs matplotlib: pip install 'mlx-dpo[report]'"
    assert not (tmp_path / "r.png").exists()


def test_a_folder_without_metrics_is_refused(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 1 and f"{tmp_path}: no metrics.jsonl" in result.output
