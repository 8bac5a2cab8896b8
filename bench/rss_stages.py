"""Resident memory after each stage of a cached train step, ours or mlx-lm-lora's, in this one process
(the stages of bench/tasks.py train and bench/peers.py mlx_lm_lora_train): where max RSS goes beyond MLX's arrays.

    python bench/rss_stages.py ours [lora|full] [--with-torch]     (the project's venv, from bench/)
    bench/.venv-peers/bin/python bench/rss_stages.py peer [lora|full]

On bench-125m and the step cache of bench/out/full (`make bench` builds them). Each line: VmRSS, its change,
VmHWM (max RSS so far), MLX's active / cache / peak memory, and the heavy modules imported so far.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from common import OUT

HEAVY = ("torch", "accelerate", "sympy", "transformers", "tokenizers", "datasets", "pandas", "pyarrow", "matplotlib")
_last = [0.0]


def mark(stage: str) -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss, hwm = (int(status[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))  # kB -> GB
    mlx = ""
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mlx = f"mlx active {mx.get_active_memory() / 2**30:.2f} cache {mx.get_cache_memory() / 2**30:.2f} peak {mx.get_peak_memory() / 2**30:.2f}"
    modules = ",".join(m for m in HEAVY if sys.modules.get(m) is not None)
    print(f"{stage:<28} RSS {rss:5.2f} GiB ({rss - _last[0]:+.2f})  max {hwm:5.2f}  {mlx}  [{modules}]", flush=True)
    _last[0] = rss


def ours(model: Path, cache: Path, fine_tune: str, steps: int, with_torch: bool) -> None:
    from mlx_dpo.process import keep_torch_out_of_transformers

    if not with_torch:
        keep_torch_out_of_transformers(["train"])  # as the `mlx-dpo` command does
    import mlx.core as mx

    mark("import mlx_dpo, mlx")
    import mlx_lm.utils  # noqa: F401  (transformers, and torch unless kept out)

    mark("import mlx_lm.utils")
    from mlx_dpo.models import load_model, load_tokenizer
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy
    from mlx_dpo.trainer.run import build_optimizer, open_cache
    from mlx_dpo.trainer.stream import PairStream
    from mlx_dpo.trainer.train import make_loss_fn, train

    mark("import mlx_dpo.trainer")
    cfg = TrainConfig(cache=str(cache), model=str(model), output="unused", fine_tune_type=fine_tune, iters=steps,
                      batch_size=4, learning_rate=1e-6)
    manifest = open_cache(str(cache))
    tokenizer = load_tokenizer(model)
    mark("load_tokenizer")
    mx.random.seed(cfg.seed)
    policy = load_model(model)
    mark("load_model")
    prepare_policy(policy, cfg)
    stream = PairStream([cache / s.path for s in manifest.splits["train"].shards], batch_size=4,
                        max_length=manifest.max_length, truncation_mode=manifest.truncation_mode,
                        pad_id=tokenizer.pad_token_id, shuffle=True, seed=cfg.seed, fixed_rows=True)
    train(policy, build_optimizer(cfg), (step for _, step in stream.forever()), make_loss_fn(cfg.loss_options()),
          iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
          on_report=lambda step, _: mark(f"step {step}"))


def peer(model: Path, rows: Path, fine_tune: str, steps: int, openblas: str | None) -> None:
    import ctypes

    if openblas:
        ctypes.CDLL(openblas, mode=ctypes.RTLD_GLOBAL)
    import mlx.core as mx
    import mlx.optimizers as optim

    mark("OpenBLAS, import mlx")
    device_info = mx.device_info
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mx.device_info = lambda: {**device_info(), "max_recommended_working_set_size": total}
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    mark("import mlx_lm, mlx_lm_lora")
    mx.random.seed(0)
    policy, _ = load_model(model)
    reference, _ = load_model(model)
    mark("load policy and reference")
    reference.freeze()
    policy.freeze()
    if fine_tune == "full":
        for layer in policy.layers:
            layer.unfreeze()
    else:
        linear_to_lora_layers(policy, len(policy.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    dataset = [{"chosen": r["prompt_ids"] + r["chosen_ids"], "rejected": r["prompt_ids"] + r["rejected_ids"],
                "chosen_prompt_length": len(r["prompt_ids"]), "rejected_prompt_length": len(r["prompt_ids"])}
               for r in json.loads(rows.read_text())]

    class Marks(TrainingCallback):
        def on_train_loss_report(self, info):
            mark(f"step {info.get('iteration', '?')}")

    out = OUT / "rss-stages"
    out.mkdir(parents=True, exist_ok=True)
    args = DPOTrainingArgs(batch_size=4, iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                           max_seq_length=4096, adapter_file=str(out / "adapters.safetensors"), beta=0.1)
    train_dpo(model=policy, ref_model=reference, optimizer=optim.AdamW(learning_rate=1e-6), train_dataset=dataset,
              val_dataset=None, args=args, training_callback=Marks(), loss_type="sigmoid")


if __name__ == "__main__":
    who, fine_tune = sys.argv[1], (sys.argv[2:3] + ["lora"])[0]
    root, steps = OUT / "full", 3
    mark("start")
    if who == "ours":
        import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)

        ours(root / "models" / "bench-125m", root / "cache-step", fine_tune, steps, "--with-torch" in sys.argv)
    else:
        found = sorted(Path.home().glob(".cache/mlx-dpo/openblas-*/libopenblas.so.0"))  # what import mlx_dpo loads
        peer(root / "models" / "bench-125m", root / "step_rows.json", fine_tune, steps, str(found[0]) if found else None)
    mark("end")
