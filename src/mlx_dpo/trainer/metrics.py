"""⑥ metrics.jsonl: one JSON object per report, TRL's metric names."""

import json
import math
import os
from pathlib import Path

from ..schemas.atomic import fsync_dir, write_text_atomic


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        created = not self.path.exists()
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the checkpoint of this step is written
        if created:
            fsync_dir(self.path.parent)
        return record

    def keep_until(self, step: int) -> list[dict]:
        """Drop the records after `step` (a resumed run writes them again); returns those kept."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a run killed mid-write
                continue
            if record["step"] <= step:
                kept.append(record)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


def format_report(record: dict) -> str:
    """One log line of a metrics record; a non-finite value (a float, or its JSON text "nan"/"inf") is
    printed as such, never an error."""
    def number(name: str, spec: str) -> str:
        value = record[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            return str(value)
        return format(value, spec) if math.isfinite(value) else str(value)

    return (
        f"[{record['split']:>5}] step {record['step']:>5} | loss {number('loss', '.4f')} | "
        f"acc {number('rewards/accuracies', '.3f')} | margin {number('rewards/margins', '+.4f')} | "
        f"chosen {number('rewards/chosen', '+.4f')} rejected {number('rewards/rejected', '+.4f')}"
        + (f" | {number('tokens_per_sec', ',.0f')} tok/s | lr {number('learning_rate', '.2e')}"
           if "tokens_per_sec" in record else "")
    )
