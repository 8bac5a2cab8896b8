"""`make bench` (or `python bench/run.py [--quick]`): mlx-dpo side by side with the alternatives.

Builds the inputs (bench/build.py), runs every measurement in its own process (bench/tasks.py,
bench/peers.py), and writes bench/results.json and bench/results.md. Every comparison is a ratio of two
numbers measured in the same run; the 1-minute load average is recorded next to each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from build import build, build_smollm2
from common import BENCH, MARK, MODES, OUT, PEER_VENV
from report import markdown, targets

PEER_PACKAGES = ["mlx-lm-lora==5.10.2"]  # the MLX peer; mlx and mlx-lm are pinned to ours


def task(label: str, script: str, name: str, spec: dict, python: str = sys.executable, env: dict | None = None,
         timeout: int = 1200) -> dict:
    """Run one measurement in a fresh process; its result dict, or {"error": why}."""
    tic = time.perf_counter()
    print(f"  {label} ...", end="", flush=True)
    cmd = [python, str(BENCH / script), name, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH,
                              env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        print(" timeout")
        return {"error": f"timed out after {timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        print(f" failed (exit {proc.returncode})")
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    result = json.loads(lines[-1][len(MARK):])
    shown = {k: v for k, v in result.items() if k in ("step_s", "tokens_per_s", "gflops_2048", "gflops_1024", "extra_peak_bytes")}
    print(f" {time.perf_counter() - tic:.0f}s {shown} (load {result['load1_before']})", flush=True)
    return result


def peer_python() -> tuple[str | None, str]:
    """bench/.venv-peers/bin/python with mlx-lm-lora installed (created on first use), or (None, why not)."""
    python, marker, log = PEER_VENV / "bin" / "python", PEER_VENV / ".installed", OUT / "peers-install.log"
    packages = PEER_PACKAGES + [f"mlx[cpu]=={version('mlx')}", f"mlx-lm=={version('mlx-lm')}"]
    if marker.exists() and marker.read_text() == " ".join(packages):
        return str(python), "installed"
    print(f"  installing {', '.join(packages)} into {PEER_VENV} (once) ...", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        ok = subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], stdout=f, stderr=f).returncode == 0
        ok = ok and subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages],
                                   stdout=f, stderr=f).returncode == 0
    if not ok:
        lines = [line for line in log.read_text().splitlines() if line.strip() and "WARNING" not in line]
        return None, f"pip install {' '.join(packages)} failed: " + " | ".join(lines[-2:])
    marker.write_text(" ".join(packages))
    return str(python), "installed"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return dict(system=f"{platform.system()} {platform.machine()}", cpu=cpu, cores=os.cpu_count(),
                avx2=" avx2" in flags, avx512f=" avx512f" in flags, memory_gb=round(mem / 2**30, 1),
                python=platform.python_version(),
                versions={p: v(p) for p in ("mlx", "mlx-lm", "mlx-dpo", "numpy", "torch", "transformers", "trl")})


def run(mode: str, with_peers: bool, lean: bool = False) -> dict:
    m = MODES[mode]
    root = OUT / mode
    print(f"mlx-dpo bench, mode {mode}: building inputs under {root} ...", flush=True)
    paths = build(mode)
    model, vocab_model = paths["models"]["bench-125m"], paths["models"]["bench-vocab"]
    max_length = 4 * (m["prompt_mean"] + m["response_mean"])
    steps = dict(warmup=m["warmup_steps"], measured=m["measured_steps"])
    res = {"mode": mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": ("make bench" if mode == "full" else "python bench/run.py --quick") + (" BENCH_ARGS=--lean" if lean else ""),
           "machine": machine(), "shapes": m["models"], "settings": {k: v for k, v in m.items() if k != "models"}}

    print("1. matmul", flush=True)
    sizes = {"sizes": m["matmul_sizes"]}
    res["matmul"] = {
        "mlx_wheel_blas": task("mlx, wheel's BLAS", "tasks.py", "matmul", sizes, env={"MLX_DPO_OPENBLAS": "0"}),
        "mlx_openblas": task("mlx after import mlx_dpo", "tasks.py", "matmul", sizes),
        "numpy": task("numpy", "tasks.py", "numpy_matmul", sizes),
    }
    status = res["matmul"]["mlx_openblas"].get("blas_status", "")
    openblas = status.split(" from ", 1)[1] if status.startswith("loaded") else None

    print("2. precompute", flush=True)
    skipped = {"error": "not run (--lean)"}
    res["precompute"] = {"ours": skipped, "trl": skipped} if lean else {
        "ours": task("mlx-dpo precompute", "tasks.py", "precompute", dict(
            model=model, data=paths["precompute_data"], out=str(root / "cache-precompute"), max_length=max_length)),
        "trl": task("TRL precompute_ref_log_probs", "peers.py", "trl_precompute", dict(
            model=model, data=paths["precompute_data"], max_length=max_length, batch_size=8, out=str(root / "trl"))),
    }

    print("3. train step (4 pairs)", flush=True)
    step_cache = str(root / "cache-step")
    res["step_cache"] = task("precompute the step pairs", "tasks.py", "precompute", dict(
        model=model, data=paths["step_data"], out=step_cache, max_length=max_length))
    vocab_cache = str(root / "cache-step-vocab")
    res["step_cache_vocab"] = task("precompute the step pairs (bench-vocab)", "tasks.py", "precompute", dict(
        model=vocab_model, data=paths["step_data"], out=vocab_cache, max_length=max_length))
    rows = step_rows(step_cache, root / "step_rows.json")
    peer, why = peer_python() if with_peers else (None, "skipped (--no-peers)")
    res["peer_install"] = why
    train = res["train"] = {}
    for ft in ("lora",) if lean else ("lora", "full"):
        common = dict(model=model, fine_tune=ft, out=str(root / f"runs/{ft}"), **steps)
        train[ft] = {
            "cached": task(f"{ft}: ours, cached reference", "tasks.py", "train", dict(common, cache=step_cache, online=False)),
            "grad_checkpoint": task(f"{ft}: ours, --grad-checkpoint", "tasks.py", "train",
                                    dict(common, cache=step_cache, online=False, grad_checkpoint=True)),
            "online": skipped if lean else task(f"{ft}: ours, online reference", "tasks.py", "train",
                                                dict(common, cache=step_cache, online=True)),
            "mlx_lm_lora": task(f"{ft}: mlx-lm-lora", "peers.py", "mlx_lm_lora_train", dict(common, rows=rows, openblas=openblas),
                                python=peer) if peer else {"error": f"mlx-lm-lora not installed: {why}"},
        }
    if lean:
        train["full"] = {k: skipped for k in ("cached", "grad_checkpoint", "online", "mlx_lm_lora", "trl_precomputed", "trl_online")}
    for label, precomputed in () if lean else (("trl_precomputed", True), ("trl_online", False)):
        train["full"][label] = task(f"full: TRL, {label[4:]}", "peers.py", "trl_train", dict(
            model=model, data=paths["step_data"], precompute=precomputed, out=str(root / f"trl-{label}"), **steps))
        train["lora"][label] = {"error": "TRL LoRA needs peft, not installed"}
    train_vocab = res["train_vocab"] = {"full": {"cached": skipped, "mlx_lm_lora": skipped}}
    for ft in ("lora",) if lean else ("lora", "full"):
        common = dict(model=vocab_model, fine_tune=ft, out=str(root / f"runs-vocab/{ft}"), **steps)
        train_vocab[ft] = {
            "cached": task(f"{ft} V=152k: ours, cached reference", "tasks.py", "train", dict(common, cache=vocab_cache, online=False)),
            "mlx_lm_lora": task(f"{ft} V=152k: mlx-lm-lora", "peers.py", "mlx_lm_lora_train", dict(common, rows=rows, openblas=openblas),
                                python=peer) if peer else {"error": f"mlx-lm-lora not installed: {why}"},
        }

    if m.get("smollm2") and not lean:
        res.update(smollm2(mode, root, max_length, steps, peer, why, openblas))

    print("4. padding", flush=True)
    res["padding"] = task("batcher padding waste", "tasks.py", "padding", dict(
        cache_rows=m["padding_pairs"], prompt_mean=m["prompt_mean"], response_mean=m["response_mean"], out=str(root / "padding")))

    print("5. log-prob memory and speed", flush=True)
    seq = m["logps_seq"]
    lg = res["logps"] = {}
    for name, path in (("vocab", vocab_model), ("125m", model)):
        for variant in ("body", "ours", "plain"):
            lg[f"{variant}_{name}"] = task(f"{variant}, {name}", "logps_tasks.py", "logps_memory",
                                           dict(model=path, variant=variant, seq=seq))
    if lean:
        return res
    print("6. optimisations (interleaved A/B in one process)", flush=True)
    res["lse_speed"] = task("log-sum-exp speed", "logps_tasks.py", "lse_speed", dict(
        rows=m["lse_rows"], vocab=m["models"]["bench-125m"]["vocab_size"]))
    rows_, seq_ = m["variants_batch"]
    res["forward_variants"] = task("precompute forward variants", "variants.py", "forward_variants", dict(
        model=model, rows=rows_, seq=seq_, reps=m["variants_reps"]))
    res["forward_variants_vocab"] = task("precompute forward variants (bench-vocab)", "variants.py", "forward_variants",
                                         dict(model=vocab_model, rows=rows_, seq=seq_, reps=m["variants_reps"]))
    res["train_variants"] = task("train step variants (LoRA)", "variants.py", "train_variants", dict(
        model=model, cache=step_cache, fine_tune="lora", reps=m["variants_reps"] - 1))
    for key, path, cache in (("head_variants", model, step_cache), ("head_variants_vocab", vocab_model, vocab_cache)):
        res[key] = task(f"LM head backward variants ({key})", "variants.py", "head_variants", dict(
            model=path, cache=cache, reps=m["variants_reps"] - 1))
    res["padding_free"] = task("padding-free rows: train step variants", "padding_free.py", "step_variants", dict(
        model=model, cache=step_cache, reps=m["variants_reps"] - 1, names=["padded", "padded_eager", "rows_x8", "rows_eager"]))
    res["padding_free_shapes"] = task("padding-free rows: padding and compiled signatures", "padding_free.py", "shape_counts",
                                      dict(pairs=m["padding_pairs"], prompt_mean=m["prompt_mean"],
                                           response_mean=m["response_mean"], out=str(root / "padding")))
    answers = m["response_mean"] // 2  # prompt-heavy data: prompts 4x the answers
    res["prompt_once"] = {
        f"{data}_{ft}": task(f"prompt once per pair, {data} data, {ft}", "variants.py", "prompt_once_variants", dict(
            model=model, fine_tune=ft, prompt_mean=p, response_mean=r, reps=m["variants_reps"]))
        for data, p, r in (("bench", m["prompt_mean"], m["response_mean"]), ("prompt_heavy", 4 * answers, answers))
        for ft in ("lora", "full")}
    return res


def step_rows(cache: str, path: Path) -> str:
    """The token ids of a step cache as JSON rows, for mlx-lm-lora (the same ids as ours)."""
    import pyarrow.parquet as pq

    table = pq.read_table(next(Path(cache).glob("train/part-*.parquet")))
    path.write_text(json.dumps(table.select(["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()))
    return str(path)


def smollm2(mode: str, root: Path, max_length: int, steps: dict, peer: str | None, why: str, openblas: str | None) -> dict:
    """The real SmolLM2-135M-Instruct (V = 49,152, 30 layers, tied embeddings): precompute beside TRL's,
    and cached LoRA and full steps beside mlx-lm-lora's, on the bench pairs in one-token words."""
    print("3b. SmolLM2-135M-Instruct", flush=True)
    try:
        smol = build_smollm2(mode)
    except Exception as error:  # no network, no torch: the tables say so instead of ending the bench
        failed = {"error": f"SmolLM2 not built: {error}"[:600]}
        return {"precompute_smollm2": {"ours": failed, "trl": failed},
                "train_smollm2": {ft: {"cached": failed, "mlx_lm_lora": failed} for ft in ("lora", "full")}}
    model = smol["model"]
    out = {"precompute_smollm2": {
        "ours": task("SmolLM2: mlx-dpo precompute", "tasks.py", "precompute", dict(
            model=model, data=smol["precompute_data"], out=str(root / "cache-precompute-smollm2"), max_length=max_length)),
        "trl": task("SmolLM2: TRL precompute_ref_log_probs", "peers.py", "trl_precompute", dict(
            model=model, data=smol["precompute_data"], max_length=max_length, batch_size=8, out=str(root / "trl-smollm2"))),
    }}
    cache = str(root / "cache-step-smollm2")
    out["step_cache_smollm2"] = task("SmolLM2: precompute the step pairs", "tasks.py", "precompute", dict(
        model=model, data=smol["step_data"], out=cache, max_length=max_length))
    train = out["train_smollm2"] = {}
    if "error" in out["step_cache_smollm2"]:
        failed = {"error": "no step cache: " + out["step_cache_smollm2"]["error"]}
        return {**out, "train_smollm2": {ft: {"cached": failed, "mlx_lm_lora": failed} for ft in ("lora", "full")}}
    rows = step_rows(cache, root / "step_rows_smollm2.json")
    for ft in ("lora", "full"):
        common = dict(model=model, fine_tune=ft, out=str(root / f"runs-smollm2/{ft}"), **steps)
        train[ft] = {
            "cached": task(f"{ft} SmolLM2: ours, cached reference", "tasks.py", "train", dict(common, cache=cache, online=False)),
            "mlx_lm_lora": task(f"{ft} SmolLM2: mlx-lm-lora", "peers.py", "mlx_lm_lora_train", dict(common, rows=rows, openblas=openblas),
                                python=peer) if peer else {"error": f"mlx-lm-lora not installed: {why}"},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (< 3 min), for developing")
    parser.add_argument("--no-peers", action="store_true", help="do not install or run mlx-lm-lora")
    parser.add_argument("--lean", action="store_true", help="on a busy machine: matmul, LoRA steps beside mlx-lm-lora "
                        "at both vocabularies, padding, log-prob memory; no precompute, full fine-tuning or layouts")
    parser.add_argument("--out", default=None, help="results stem (default bench/results, or bench/out/quick-results)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    stem = Path(args.out) if args.out else (BENCH / "results" if mode == "full" else OUT / "quick-results")
    tic = time.perf_counter()
    res = run(mode, with_peers=not args.no_peers, lean=args.lean)
    res["bench_seconds"] = round(time.perf_counter() - tic, 1)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")  # kept even if the report fails
    res["targets"] = targets(res)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"\n{markdown(res)}\nWrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} in {res['bench_seconds']:.0f}s")


if __name__ == "__main__":
    main()
