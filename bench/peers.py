"""The peers, one task per process, on the same model files and token ids as ours:

- trl_precompute, trl_train: TRL's DPOTrainer (torch, CPU, float32) in the project's venv (test extras);
- mlx_lm_lora_train: mlx-lm-lora's DPO trainer, in its own venv (bench/.venv-peers), never in the
  project's requirements. It runs with the same OpenBLAS as ours, so the comparison is of trainers, not BLAS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import cpu_per_step, rate_stats, step_stats, task_main


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _trl_config(out: str, **kw):
    from trl import DPOConfig

    # float32 like ours (DPOConfig defaults to bf16 autocast); no gradient checkpointing (ours has none).
    return DPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, fp16=False, save_strategy="no",
                     gradient_checkpointing=False, dataloader_num_workers=0, logging_steps=10**6, **kw)


def _torch_model(model: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), AutoTokenizer.from_pretrained(model)


def trl_precompute(model: str, data: str, max_length: int, batch_size: int, out: str) -> dict:
    """DPOTrainer(precompute_ref_log_probs=True): its reference pass over the data, timed on its own."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    batches = []
    original = DPOTrainer.compute_ref_log_probs

    def timed(self, model_, inputs):  # one reference batch of the precompute
        tic = time.perf_counter()
        result = original(self, model_, inputs)
        batches.append((int(inputs["attention_mask"].sum()), time.perf_counter() - tic))
        return result

    DPOTrainer.compute_ref_log_probs = timed
    policy, tokenizer = _torch_model(model)
    args = _trl_config(out, precompute_ref_log_probs=True, precompute_ref_batch_size=batch_size, max_length=max_length)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(_read_jsonl(data)),
                         processing_class=tokenizer)
    stats = rate_stats(batches)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    assert stats["tokens"] == tokens, "timed batches do not cover the data"
    return dict(stats, batch_size=batch_size, torch_threads=torch.get_num_threads())


def trl_train(model: str, data: str, precompute: bool, warmup: int, measured: int, out: str) -> dict:
    """DPOTrainer steps, full fine-tuning of the transformer blocks (embeddings and lm_head frozen, as ours);
    online: TRL loads its own reference copy and runs it every step."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    try:
        import peft  # noqa: F401
    except ImportError:
        peft = None
    policy, tokenizer = _torch_model(model)
    policy.model.embed_tokens.requires_grad_(False)
    policy.lm_head.requires_grad_(False)
    marks, cpu = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append(time.perf_counter())
                cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())

    args = _trl_config(out, precompute_ref_log_probs=precompute, per_device_train_batch_size=4,
                       max_steps=warmup + measured, learning_rate=1e-6, lr_scheduler_type="constant")
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(_read_jsonl(data)),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    return dict(**step_stats(seconds, warmup), step_cpu_s=cpu_per_step(cpu, warmup), torch_threads=torch.get_num_threads(), peft_installed=peft is not None)


def mlx_lm_lora_train(model: str, rows: str, fine_tune: str, warmup: int, measured: int, out: str,
                      openblas: str | None) -> dict:
    """mlx-lm-lora's train_dpo with a reference copy (as its CLI does), LoRA or full like ours."""
    import ctypes

    if openblas:  # the library `import mlx_dpo` loaded in our processes; before mlx, as there
        ctypes.CDLL(openblas, mode=ctypes.RTLD_GLOBAL)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    device_info = mx.device_info
    if "max_recommended_working_set_size" not in device_info():  # Linux: train_dpo reads it first thing
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mx.device_info = lambda: {**device_info(), "max_recommended_working_set_size": total}
    from importlib.metadata import version

    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    mx.random.seed(0)
    policy, _ = load_model(Path(model))
    reference, _ = load_model(Path(model))
    reference.freeze()
    policy.freeze()
    if fine_tune == "full":  # the same parameters as ours: every transformer block
        for layer in policy.layers:
            layer.unfreeze()
    else:
        linear_to_lora_layers(policy, len(policy.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    trainable = sum(v.size for _, v in tree_flatten(policy.trainable_parameters()))
    dataset = [
        {"chosen": r["prompt_ids"] + r["chosen_ids"], "rejected": r["prompt_ids"] + r["rejected_ids"],
         "chosen_prompt_length": len(r["prompt_ids"]), "rejected_prompt_length": len(r["prompt_ids"])}
        for r in json.loads(Path(rows).read_text())
    ]
    seconds, cpu = [], [time.process_time()]

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):  # steps_per_report=1: its own per-step timer
            seconds.append(1.0 / info["iterations_per_second"])
            cpu.append(time.process_time())

    Path(out).mkdir(parents=True, exist_ok=True)
    args = DPOTrainingArgs(batch_size=4, iters=warmup + measured, steps_per_report=1, steps_per_eval=10**9,
                           steps_per_save=10**9, max_seq_length=4096, adapter_file=str(Path(out) / "adapters.safetensors"),
                           beta=0.1)
    train_dpo(model=policy, ref_model=reference, optimizer=optim.AdamW(learning_rate=1e-6),
              train_dataset=dataset, val_dataset=None, args=args, training_callback=Clock(), loss_type="sigmoid")
    return dict(**step_stats(seconds, warmup), step_cpu_s=cpu_per_step(cpu, warmup), trainable_params=trainable, mlx_peak_bytes=int(mx.get_peak_memory()),
                version=version("mlx-lm-lora"), openblas_preloaded=bool(openblas))


if __name__ == "__main__":
    task_main({f.__name__: f for f in (trl_precompute, trl_train, mlx_lm_lora_train)})
