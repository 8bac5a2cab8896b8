"""`mlx-dpo report`: compare runs side by side, as a terminal table and (with matplotlib) one PNG.

Runs that share a cache differ only in their training options, so the table shows the options that
differ between the runs, next to the final train and held-out metrics.
"""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from .tables import format_table, number

PANELS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
# Config keys that name files or identities rather than choices worth comparing.
_NOT_OPTIONS = {"output", "cache", "cache_identity", "model"}


@dataclass
class Run:
    path: Path
    config: dict
    records: list[dict]

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        # float(): metrics.jsonl writes nan/inf as the strings "nan"/"inf"
        points = [(r["step"], float(r[key])) for r in self.records if r["split"] == split and key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, split: str) -> dict | None:
        return next((r for r in reversed(self.records) if r["split"] == split), None)


def load_run(run_dir: str) -> Run:
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not an mlx-dpo run directory; see `mlx-dpo train --output`)")
    records = []
    for number_, line in enumerate(metrics.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{metrics}:{number_}: not a JSON line ({error})") from error
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return Run(path, config or {}, records)


def cache_label(run: Run) -> str:
    """The run's cache identity, shortened; a run on several caches shows each one's, joined by +."""
    identity = run.config.get("cache_identity", "?")
    return "+".join(i[:6] for i in identity) if isinstance(identity, list) else str(identity)[:12]


def differing_options(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run, in config order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config if k not in _NOT_OPTIONS))
    return [k for k in keys if len({json.dumps(run.config.get(k)) for run in runs}) > 1]


def run_labels(runs: list[Run]) -> list[str]:
    """Short names: the run folder's name, or its whole path when two runs share a name."""
    names = [run.path.name for run in runs]
    return [str(run.path) if names.count(run.path.name) > 1 else run.path.name for run in runs]


def summary_table(runs: list[Run]) -> str:
    options = differing_options(runs) if len(runs) > 1 else ["beta", "learning_rate"]
    header = ["run", "cache"] + options + ["steps", "train loss", "eval loss", "eval acc", "eval margin", "tok/s",
                                           "peak GB"]
    rows = []
    for label, run in zip(run_labels(runs), runs):
        train, final_eval = run.last("train"), run.last("eval") or {}
        first_eval = next((r for r in run.records if r["split"] == "eval"), {})
        speeds = [float(r["tokens_per_sec"]) for r in run.records if "tokens_per_sec" in r]
        peaks = [float(r["peak_memory_gb"]) for r in run.records if "peak_memory_gb" in r]
        eval_loss = (f"{number(first_eval.get('loss'))} -> {number(final_eval.get('loss'))}"
                     if len(first_eval) and first_eval is not final_eval else number(final_eval.get("loss")))
        rows.append([
            label, cache_label(run), *(run.config.get(k) for k in options),
            train["step"] if train else None, number(train.get("loss")) if train else None, eval_loss,
            number(final_eval.get("rewards/accuracies"), 3), number(final_eval.get("rewards/margins")),
            f"{statistics.median(speeds):,.0f}" if speeds else None, f"{max(peaks):.2f}" if peaks else None,
        ])
    lines = [format_table(header, rows, left=2)]
    caches = {json.dumps(run.config.get("cache_identity")) for run in runs}
    if len(caches) > 1:
        lines.append(f"Note: these runs use {len(caches)} different caches (reference model, tokenizer, data or "
                     "options differ); compare their numbers with care.")
    return "\n".join(lines)


def _labels_with_options(runs: list[Run]) -> list[str]:
    options = differing_options(runs)
    return [label + "".join(f" {k}={run.config.get(k)}" for k in options)
            for label, run in zip(run_labels(runs), runs)]


def plot_runs(runs: list[Run], out: str):
    """Five panels against step, one colour per run: train as a line, eval as dashed line with dots."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads and tests
    except ImportError as error:
        raise UserError("report --out needs matplotlib: pip install 'mlx-dpo[report]'") from error

    figure = Figure(figsize=(14, 7.5), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, PANELS):
        for run, colour in zip(runs, colours):
            ax.plot(*run.series("train", key), color=colour, linewidth=1.4, alpha=0.85)
            ax.plot(*run.series("eval", key), color=colour, linestyle="--", marker="o", markersize=4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = axes[-1]
    legend.axis("off")
    for label, colour in zip(_labels_with_options(runs), colours):
        legend.plot([], [], color=colour, linewidth=2, label=label)
    legend.plot([], [], color="grey", linewidth=1.4, label="train (solid)")
    legend.plot([], [], color="grey", linestyle="--", marker="o", markersize=4, label="eval (dashed, dots)")
    legend.legend(loc="center", frameon=False, fontsize=10)
    caches = ", ".join(sorted({cache_label(r) for r in runs}))
    figure.suptitle(f"mlx-dpo report: {len(runs)} run(s), cache {caches}")
    figure.savefig(out, dpi=80)
    return figure


def report(run_dirs: list[str], out: str | None = None, log=print, *, pairs: bool = False,
           samples: bool = False, top: int = 3) -> list[Run]:
    """The comparison table and plot; with `pairs` or `samples`, those views instead (report_pairs.py),
    and `out` then plots the pairs."""
    runs = [load_run(d) for d in run_dirs]
    if not (pairs or samples):
        log(summary_table(runs))
    from . import report_pairs

    labels = run_labels(runs)
    for run, label in zip(runs, labels):
        if pairs:
            log(report_pairs.pairs_summary(run, label, top))
        if samples:
            log(report_pairs.samples_summary(run, label))
    if out is not None:
        report_pairs.plot_pairs(runs, labels, out) if pairs else plot_runs(runs, out)
        log(f"Wrote {out}")
    return runs
