"""results.json -> the targets of issues #7 and #13 (met / missed, with the measured value) and results.md."""

from __future__ import annotations

SMOLLM2_VOCAB = 49152
HANDFUL = 5  # "a handful" of compiled shapes per run, as the target counts them


def get(d, *keys):
    """d[k1][k2]...; None when a key is missing or the measurement failed."""
    for k in keys:
        if not isinstance(d, dict) or k not in d or "error" in d:
            return None
        d = d[k]
    return d


def largest(res) -> int:
    return max(res["settings"]["matmul_sizes"])


def sgemm_peak(res) -> float | None:
    n = largest(res)
    values = [get(res, "matmul", k, f"gflops_{n}") for k in ("mlx_openblas", "numpy")]
    values = [v for v in values if v]
    return max(values) if values else None


def _target(name: str, measured: str, ok) -> dict:
    return {"target": name, "measured": measured, "met": None if ok is None else bool(ok)}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def targets(res: dict) -> list[dict]:
    out, n = [], largest(res)
    r = _ratio(get(res, "matmul", "mlx_openblas", f"gflops_{n}"), get(res, "matmul", "numpy", f"gflops_{n}"))
    out.append(_target("MLX matmul after `import mlx_dpo` >= 0.5x numpy", _fmt(r, "{:.2f}x"), r and r >= 0.5))
    r = _ratio(get(res, "precompute", "ours", "best_half_model_gflops"), sgemm_peak(res))
    out.append(_target("precompute model FLOP/s >= 50% of measured sgemm peak", _fmt(r, "{:.0%}"), r and r >= 0.5))
    r = _ratio(get(res, "precompute", "ours", "best_half_tokens_per_s"), get(res, "precompute", "trl", "best_half_tokens_per_s"))
    out.append(_target("precompute tokens/s >= 1.5x TRL's precompute", _fmt(r, "{:.2f}x"), r and r >= 1.5))
    r = _ratio(get(res, "precompute_smollm2", "ours", "best_half_tokens_per_s"), get(res, "precompute_smollm2", "trl", "best_half_tokens_per_s"))
    if "precompute_smollm2" in res:
        out.append(_target("SmolLM2: precompute tokens/s >= 1.5x TRL's precompute", _fmt(r, "{:.2f}x"), r and r >= 1.5))
    sizes = {k: f"{v['vocab_size']:,}" for k, v in res["shapes"].items()}
    models = [("train", sizes["bench-125m"], 2.0, 0.6), ("train_vocab", sizes["bench-vocab"], 2.5, 0.4)]
    if "train_smollm2" in res:  # V = 49,152: held to the V = 32k targets
        models.append(("train_smollm2", f"{SMOLLM2_VOCAB:,} (SmolLM2)", 2.0, 0.6))
    for key, vocab, speed, memory in models:
        for ft in ("lora", "full"):
            t = get(res, key, ft) or {}
            cached, peer = get(t, "cached", "step_s"), get(t, "mlx_lm_lora", "step_s")
            r = _ratio(peer, cached)
            out.append(_target(f"{ft}, V={vocab}: cached step >= {speed}x faster than mlx-lm-lora", _fmt(r, "{:.2f}x faster"),
                               r and r >= speed))
            for name, field in (("peak", "mlx_peak_bytes"), ("max RSS", "max_rss_bytes")):
                r = _ratio(get(t, "cached", field), get(t, "mlx_lm_lora", field))
                out.append(_target(f"{ft}, V={vocab}: {name} <= {memory}x mlx-lm-lora's", _fmt(r, "{:.2f}x"), r and r <= memory))
    for ft in ("lora", "full"):
        r = _ratio(get(res, "train", ft, "cached", "step_s"), get(res, "train", ft, "online", "step_s"))
        out.append(_target(f"{ft}: cached-reference step <= 0.75x online-reference step", _fmt(r, "{:.2f}x"), r and r <= 0.75))
    w = get(res, "padding", "ours_b4")
    out.append(_target("padding waste <= 3% (batch 4, PairStream as train runs it)", _fmt(w, "{:.1%}"), None if w is None else w <= 0.03))
    c, c3 = get(res, "padding", "compiled_shapes_b4"), get(res, "padding", "compiled_shapes_b4_3_epochs")
    out.append(_target(f"compiled step traced a handful of times per run (<= {HANDFUL} input shapes)",
                       "n/a" if c is None else f"{c:,} shapes in an epoch, {c3:,} in 3 epochs", None if c3 is None else c3 <= HANDFUL))
    budget = get(res, "logps", "ours_vocab", "chunk_budget_bytes")
    grows = [None if None in (get(res, "logps", f"ours_{v}", "extra_peak_bytes"), get(res, "logps", f"body_{v}", "extra_peak_bytes"))
             else get(res, "logps", f"ours_{v}", "extra_peak_bytes") - get(res, "logps", f"body_{v}", "extra_peak_bytes")
             for v in ("125m", "vocab")]
    ok = None if None in grows or budget is None else max(grows) <= budget
    measured = "n/a" if None in grows else (f"{grows[0] / 1e9:.3f} GB at V={sizes['bench-125m']}, "
                                            f"{grows[1] / 1e9:.3f} GB at V={sizes['bench-vocab']}")
    out.append(_target(f"log-prob memory above the body <= the chunk budget ({_gb(budget)} GB), flat in V", measured, ok))
    return out


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _gb(value) -> str:
    return "" if value is None else f"{value / 1e9:.2f}"


def _cell(d, key: str, pattern: str = "{:.2f}") -> str:
    if d is None:
        return "n/a"
    if "error" in d:
        return "not run: " + d["error"].replace("|", "/")[:160]
    return _fmt(d.get(key), pattern)


def markdown(res: dict) -> str:
    mach, n = res["machine"], largest(res)
    loads = [v for v in _walk(res) if isinstance(v, dict) for v in (v.get("load1_before"), v.get("load1_after")) if v is not None]
    vers = ", ".join(f"{k} {v}" for k, v in mach["versions"].items() if v)
    lines = [
        f"Command `{res['command']}` ({res['mode']} mode), {res['date'][:16].replace('T', ' ')} UTC, "
        f"{res.get('bench_seconds', 0) / 60:.1f} min. Machine: {mach['system']}, {mach['cpu']}, {mach['cores']} cores"
        f"{' (AVX2)' if mach['avx2'] else ''}, {mach['memory_gb']} GiB; {vers}. 1-minute load average during the "
        f"run {min(loads, default=0):.1f}-{max(loads, default=0):.1f} on {mach['cores']} cores (shared machine: "
        "numbers above the core count mean contention).", "",
        f"**1. float32 matmul {n}x{n}**", "", "| | GFLOP/s | vs numpy |", "|---|---:|---:|",
    ]
    npy = get(res, "matmul", "numpy", f"gflops_{n}")
    for key, label in (("mlx_wheel_blas", "MLX, the wheel's BLAS (`MLX_DPO_OPENBLAS=0`)"),
                       ("mlx_openblas", "MLX after `import mlx_dpo` (OpenBLAS)"), ("numpy", "numpy")):
        g = get(res, "matmul", key, f"gflops_{n}")
        lines.append(f"| {label} | {_cell(res['matmul'][key], f'gflops_{n}', '{:.1f}')} | {_fmt(_ratio(g, npy), '{:.2f}x')} |")
    peak, ours, trl = sgemm_peak(res), res["precompute"]["ours"], res["precompute"]["trl"]
    lines += ["", f"**2. Reference precompute**, bench-125m, {res['settings']['precompute_pairs']} pairs "
              f"({_cell(ours, 'tokens', '{:,}')} tokens); model FLOP/s = 2 x {_cell(ours, 'matmul_params', '{:,}')} "
              f"matmul weights x tokens/s, against the sgemm peak of figure 1 ({_fmt(peak, '{:.0f}')} GFLOP/s). "
              "Fastest half: the rate over the fastest batches holding half the tokens, which other jobs on the "
              "cores disturb least; ratios and targets use it.", "",
              "| | tokens/s, all batches | tokens/s, fastest half | model GFLOP/s | of sgemm peak | vs TRL |",
              "|---|---:|---:|---:|---:|---:|"]
    trl_fast = get(trl, "best_half_tokens_per_s")
    for d, label in ((ours, "`mlx-dpo precompute` (reference forwards)"), (trl, "TRL `precompute_ref_log_probs` (torch CPU)")):
        fast = get(d, "best_half_tokens_per_s")
        gf = fast and get(ours, "matmul_params") and 2 * get(ours, "matmul_params") * fast / 1e9
        lines.append(f"| {label} | {_cell(d, 'tokens_per_s', '{:,.0f}')} | {_fmt(fast, '{:,.0f}')} | {_fmt(gf, '{:.0f}')} | "
                     f"{_fmt(_ratio(gf, peak), '{:.0%}')} | {_fmt(_ratio(fast, trl_fast), '{:.2f}x')} |")
    smol = res.get("precompute_smollm2")
    if smol:
        s_ours, s_trl = smol["ours"], smol["trl"]
        s_fast = get(s_trl, "best_half_tokens_per_s")
        lines.append(f"| **SmolLM2-135M-Instruct** ({_cell(s_ours, 'tokens', '{:,}')} tokens) | | | | | |")
        for d, label in ((s_ours, "`mlx-dpo precompute` (reference forwards)"), (s_trl, "TRL `precompute_ref_log_probs` (torch CPU)")):
            fast = get(d, "best_half_tokens_per_s")
            gf = fast and get(s_ours, "matmul_params") and 2 * get(s_ours, "matmul_params") * fast / 1e9
            lines.append(f"| {label} | {_cell(d, 'tokens_per_s', '{:,.0f}')} | {_fmt(fast, '{:,.0f}')} | {_fmt(gf, '{:.0f}')} | "
                         f"{_fmt(_ratio(gf, peak), '{:.0%}')} | {_fmt(_ratio(fast, s_fast), '{:.2f}x')} |")
    lines.append(f"\n`mlx-dpo precompute` end to end (load, tokenize, hash, write): {_cell(ours, 'end_to_end_tokens_per_s', '{:,.0f}')} tokens/s.")
    lines += _train_table(res) + _padding_table(res) + _logps_table(res) + _variants_table(res)
    lines += ["", "**Targets**", "", "| target | measured | |", "|---|---|---|"]
    for t in res.get("targets", []):
        mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {mark} |")
    return "\n".join(lines) + "\n"


def _walk(d):
    yield d
    if isinstance(d, dict):
        for v in d.values():
            yield from _walk(v)


def _train_table(res) -> list[str]:
    t, c = res["train"], get(res, "train", "lora", "cached")
    head = (f"**3. Train step**, bench-125m, 4 pairs ({_cell(c, 'real_tokens', '{:,}')} tokens, padded to "
            f"{_cell(c, 'padded_tokens', '{:,}')} by mlx-dpo); s/step = the fastest of {res['settings']['measured_steps']} "
            f"steps after {res['settings']['warmup_steps']} warm-up (median in results.json); peak = `mx.get_peak_memory()`, "
            "RSS = max resident set")
    lines = ["", head, "", "| | LoRA s/step | LoRA peak GB | LoRA RSS GB | full s/step | full peak GB | full RSS GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = (("cached", "`mlx-dpo train` (cached reference)"), ("grad_checkpoint", "same, `--grad-checkpoint`"),
            ("online", "same trainer, online reference (bench only)"),
            ("mlx_lm_lora", "mlx-lm-lora DPO (reference copy)"), ("trl_precomputed", "TRL DPOTrainer, precomputed"),
            ("trl_online", "TRL DPOTrainer, online"))
    for key, label in rows:
        cells = []
        for ft in ("lora", "full"):
            d = t[ft].get(key)
            if d is None or "error" in d:
                cells += [_cell(d, "step_s"), "", ""]
            else:
                cells += [f"{d['step_s']:.2f}", _gb(d.get("mlx_peak_bytes")) or "-", _gb(d.get("max_rss_bytes"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    blocks = (("train_vocab", f"bench-vocab (V={res['shapes']['bench-vocab']['vocab_size']:,})"),
              ("train_smollm2", f"SmolLM2-135M-Instruct (V={SMOLLM2_VOCAB:,}, 30 layers, tied embeddings)"))
    for block, title in blocks:
        if not res.get(block):
            continue
        lines.append(f"| **{title}** | | | | | | |")
        for key, label in (("cached", "`mlx-dpo train` (cached reference)"), ("mlx_lm_lora", "mlx-lm-lora DPO (reference copy)")):
            cells = []
            for ft in ("lora", "full"):
                d = res[block][ft].get(key)
                cells += [_cell(d, "step_s"), "", ""] if d is None or "error" in d else \
                    [f"{d['step_s']:.2f}", _gb(d.get("mlx_peak_bytes")) or "-", _gb(d.get("max_rss_bytes"))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    shapes = [f"{name} {ft} {n}" for block, name in (("train", "bench-125m"), ("train_vocab", "bench-vocab"),
                                                      ("train_smollm2", "SmolLM2")) for ft in ("lora", "full")
              if (n := get(res, block, ft, "cached", "compiled_shapes")) is not None]
    if shapes:
        lines.append(f"\nDistinct input shapes our compiled step was traced for in each run above (`compiled_shapes`, "
                     f"metrics.jsonl): {', '.join(shapes)}.")
    return lines


def _padding_table(res) -> list[str]:
    p = res["padding"]
    if "error" in p:
        return ["", f"**4. Padding waste**: not run: {p['error']}"]
    lines = ["", f"**4. Padding waste** (padded / total tokens) over {res['settings']['padding_pairs']:,} pairs with "
             "the bench's length distribution", "", "| batcher | batch 4 | batch 8 |", "|---|---:|---:|"]
    if "ours_b4" in p:
        lines.append(f"| mlx-dpo `PairStream`, the default shape ladder (mlx_dpo.shapes) | {p['ours_b4']:.1%} | {p['ours_b8']:.1%} |")
    for x in (32, 8, 1):
        label = f"mlx-dpo `PairStream`, pad to x{x}" + (" (the default before the ladders)" if x == 32 else "")
        lines.append(f"| {label} | {p[f'ours_b4_x{x}']:.1%} | {p[f'ours_b8_x{x}']:.1%} |")
    for x in (32, 8):
        if f"ours_b4_split_x{x}" in p:
            lines.append(f"| candidate: chosen and rejected rows padded apart, x{x} | {p[f'ours_b4_split_x{x}']:.1%} | |")
    for k, label in (("pack_longest", "packed rows as wide as the batch's longest sequence"),
                     ("pack_one_row", "packed: the batch's 8 sequences in one row")):
        if f"{k}_waste" in p:
            lines.append(f"| {label} (attention scores {p[f'{k}_attention_scores_vs_padded']:.2f}x padded x8) | "
                         f"{p[f'{k}_waste']:.1%} | |")
    lines.append(f"| mlx-lm-lora (sorted by chosen length) | {p['mlx_lm_lora_b4']:.1%} | |")
    lines.append(f"| TRL (random batches) | {p['trl_b4']:.1%} | |")
    if "ladders" in p:
        lines += ["", "Shape ladders (batch 4, train's stream): each distinct input shape is one trace of the compiled step; "
                  "widths round up to multiples of m growing by ratio r, scored positions likewise.", "",
                  "| widths (m, r) | scored positions (m, r) | token padding | scored-position padding | widths | shapes, 1 epoch |",
                  "|---|---|---:|---:|---:|---:|"]
        for d in p["ladders"]:
            name = " **(default)**" if d["default"] else (" (before the ladders)" if (d["width_ratio"], d["score_ratio"], d["width_multiple"]) == (1.0, 1.0, 32) else "")
            lines.append(f"| x{d['width_multiple']}, {d['width_ratio']}{name} | x{d['score_multiple']}, {d['score_ratio']} | "
                         f"{d['waste']:.1%} | {d['scored_waste']:.1%} | {d['widths']} | {d['shapes']} |")
        lines.append(f"\nThe default over 3 epochs: {p['compiled_shapes_b4_3_epochs']} distinct input shapes.")
    return lines


def _logps_table(res) -> list[str]:
    lg, s = res["logps"], res["settings"]
    v_small, v_big = res["shapes"]["bench-125m"]["vocab_size"], res["shapes"]["bench-vocab"]["vocab_size"]
    budget = get(lg, "ours_vocab", "chunk_budget_bytes")
    lines = ["", f"**5. Log-prob pass**, one sequence of {s['logps_seq']} tokens (prompt = first third): peak memory "
             f"above the loaded weights (GB), and seconds; chunk budget `LOGITS_CHUNK_BYTES` = {_gb(budget)} GB", "",
             f"| | V={v_small:,} | V={v_big:,} | seconds V={v_small:,} | seconds V={v_big:,} |", "|---|---:|---:|---:|---:|"]
    for variant, label in (("body", "transformer body only (no lm_head)"),
                           ("ours", "`mlx_dpo.logps.sequence_logps` (scored positions, chunked)"),
                           ("plain", "plain `log_softmax` over [B, T, V] (src before #13)")):
        small, big = lg.get(f"{variant}_125m"), lg.get(f"{variant}_vocab")
        lines.append(f"| {label} | {_gb(get(small, 'extra_peak_bytes')) or _cell(small, '')} | "
                     f"{_gb(get(big, 'extra_peak_bytes')) or _cell(big, '')} | {_cell(small, 'seconds')} | {_cell(big, 'seconds')} |")
    big = get(lg, "ours_vocab", "logits_bytes")
    lines.append(f"\nThe float32 logits alone are {_gb(big)} GB at V={v_big:,}.")
    sp = res.get("lse_speed", {})
    if "error" not in sp and sp:
        lines.append(f"Log-sum-exp over [{sp['rows']:,}, {sp['vocab']:,}]: `mx.logsumexp` {sp['mx_logsumexp_s']:.3f} s, "
                     f"compiled max/exp/sum {sp['mx_compiled_s']:.3f} s, numpy {sp['numpy_lse_s']:.3f} s; exp alone "
                     f"{sp['mx_exp_melem_per_s']:.0f} M elements/s in MLX vs {sp['numpy_exp_melem_per_s']:.0f} M in numpy.")
    return lines


def _variants_table(res) -> list[str]:
    lines = ["", "**6. Layouts measured against each other** in one process, runs interleaved; fastest of the runs."]
    for key, model in (("forward_variants", "bench-125m"), ("forward_variants_vocab", "bench-vocab")):
        fv = res.get(key)
        if not fv or "error" in fv:
            lines.append(f"\nPrecompute forward, {model}: not run: {fv and fv.get('error')}")
            continue
        lines += ["", f"Precompute forward, {model}, {fv['rows']} x {fv['seq']} tokens (prompt = first third):", "",
                  "| layout | seconds | vs plain | max abs diff of log-probs |", "|---|---:|---:|---:|"]
        for name, label in (("plain", "plain full logits, one stream (src before #13)"),
                            ("one_stream", "src `batch_logps`, both halves on one stream"),
                            ("two_streams", "src `batch_logps`, one stream per core (what precompute runs)")):
            lines.append(f"| {label} | {fv[f'{name}_s']:.3f} | {fv[f'{name}_vs_plain']:.2f}x | {fv[f'{name}_max_abs_diff']:.1e} |")
    tv = res.get("train_variants")
    if tv and "error" not in tv:
        lines += ["", f"Train step ({tv['fine_tune']}, bench-125m, 4 pairs = {tv['real_tokens']:,} tokens, compiled):", "",
                  "| layout | tokens in the batch | s/step | vs src | peak GB |", "|---|---:|---:|---:|---:|"]
        for name, label in (("plain", "plain full logits (src before #13), pad x32"), ("src", "src, pad x32 (the default before the shape ladders)"),
                            ("src_x8", "src, pad x8"), ("packed", "src, packed: one row, block-diagonal mask")):
            lines.append(f"| {label} | {tv[f'{name}_padded_tokens']:,} | {tv[f'{name}_s']:.2f} | {tv[f'{name}_vs_src']:.2f}x | "
                         f"{_gb(tv.get(f'{name}_peak_bytes'))} |")
    elif tv:
        lines.append(f"\nTrain step variants: not run: {tv['error']}")
    return lines + _head_table(res) + _prompt_once_table(res.get("prompt_once") or {}) + _padding_free_table(res)


def _head_table(res) -> list[str]:
    runs = [res.get(k) for k in ("head_variants", "head_variants_vocab") if res.get(k)]
    if not runs:
        return []
    lines = ["", "LM head backward (compiled LoRA step, 4 pairs padded to x8; the same chunks): autodiff of each chunk's "
             "forward (src before the saved log-sum-exp) against the saved log-sum-exp (src):", "",
             "| vocabulary | scored positions | autodiff s/step | src s/step | src vs autodiff | autodiff peak GB | src peak GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for hv in runs:
        if "error" in hv:
            lines.append(f"| not run: {hv['error']} | | | | | | |")
            continue
        lines.append(f"| {hv['vocab']:,} | {hv['scored_positions']:,} of {hv['plan_positions']:,} | {hv['autodiff_s']:.2f} | "
                     f"{hv['src_s']:.2f} | {hv['src_vs_autodiff']:.2f}x | {_gb(hv['autodiff_peak_bytes'])} | {_gb(hv['src_peak_bytes'])} |")
    return lines


def _prompt_once_table(po: dict) -> list[str]:
    """Today's prompt+answer rows against the prompt once per pair (bench/variants.py prompt_once_variants)."""
    if not po:
        return []
    lines = ["", "The prompt once per pair (`mlx_dpo.prompt_once`), bench-125m, 4 pairs, both layouts at the trainer's "
             "ladders; the forward is the no-grad pass precompute runs, on one stream:", "",
             "| data (prompt / answer mean tokens) | fine-tuning | tokens: src / once | step s: src / once | "
             "forward s: src / once | max abs diff of log-probs |", "|---|---|---:|---:|---:|---:|"]
    for key, r in po.items():
        if "error" in r:
            lines.append(f"| {key} | | not run: {r['error']} | | | |")
            continue
        lines.append(f"| {key.rsplit('_', 1)[0]} ({r['prompt_mean']} / {r['response_mean']}) | {r['fine_tune']} | "
                     f"{r['src_tokens']:,} / {r['once_tokens']:,} | {r['src_step_s']:.2f} / {r['once_step_s']:.2f} "
                     f"({r['once_vs_src_step']:.2f}x) | {r['src_forward_s']:.2f} / {r['once_forward_s']:.2f} "
                     f"({r['once_vs_src_forward']:.2f}x) | {r['max_abs_diff']:.1e} |")
    return lines


def _padding_free_table(res) -> list[str]:
    """The padded step against each row run alone at its own width (bench/padding_free.py)."""
    pf, shapes = res.get("padding_free"), res.get("padding_free_shapes") or {}
    if not pf:
        return []
    if "error" in pf:
        return ["", f"Padding-free rows: not run: {pf['error']}"]
    lines = ["", f"Padding-free rows (`mlx_dpo.padding_free`: each row's body alone, at its own width), bench-125m, 4 pairs: "
             f"{pf['needed_positions']:,} body positions needed, {pf['padded_positions']:,} run padded; seconds (wall) and "
             f"process CPU seconds per step, fastest of {pf['reps']}; a first call traces a compiled step:", "",
             "| fine-tuning | layout | positions | s/step | vs padded | CPU s | CPU vs padded | first call s | peak GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    labels = (("padded", "padded (train's compiled step)", "padded_positions"), ("padded_eager", "padded, not compiled", "padded_positions"),
              ("rows_x8", "rows x8, compiled (a trace per tuple of widths)", "rows_x8_positions"),
              ("rows_eager", "rows unrounded, not compiled", "needed_positions"))
    for ft in ("lora", "full"):
        for name, label, positions in labels:
            if f"{ft}_{name}_s" in pf:
                key = f"{ft}_{name}"
                cells = [_cell(pf, key + suffix, pattern) for suffix, pattern in (
                    ("_s", "{:.2f}"), ("_vs_padded", "{:.2f}x"), ("_cpu_s", "{:.2f}"), ("_cpu_vs_padded", "{:.2f}x"),
                    ("_first_call_s", "{:.2f}"))]
                lines.append(f"| {ft} | {label} | {pf[positions]:,} | {' | '.join(cells)} | {_gb(pf.get(key + '_peak_bytes'))} |")
    if shapes and "error" not in shapes:
        lines += ["", f"Over an epoch ({shapes['steps']:,} steps of batch 4, the bench's lengths): padded, "
                  f"{shapes['padded_waste']:.1%} of the body's positions are padding and the step meets "
                  f"{shapes['padded_shapes']} input shapes; rows x8, {shapes['rows_x8_waste']:.1%} and "
                  f"{shapes['rows_x8_shapes']:,} tuples of widths (compiled: one trace each); rows x32 growing 1.25x a rung, "
                  f"{shapes['rows_x32_r1.25_waste']:.1%} and {shapes['rows_x32_r1.25_shapes']:,} "
                  f"({shapes['rows_x32_r1.25_shapes_sorted']:,} with the rows sorted by width)."]
    return lines
