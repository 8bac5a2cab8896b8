"""results.json -> the targets of issue #7 (met / missed, with the measured value) and results.md."""

from __future__ import annotations

SRC_CHUNK_POSITIONS = 1024  # mlx_dpo.logps._CHUNK_POSITIONS: token_logps' logsumexp chunk


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
    out.append(_target("precompute tokens/s >= 2x TRL's precompute", _fmt(r, "{:.2f}x"), r and r >= 2))
    for ft in ("lora", "full"):
        t = res["train"][ft]
        cached, online, peer = (get(t, k, "step_s") for k in ("cached", "online", "mlx_lm_lora"))
        r = _ratio(cached, online)
        out.append(_target(f"{ft}: cached-reference step <= 0.75x online-reference step", _fmt(r, "{:.2f}x"), r and r <= 0.75))
        r = _ratio(peer, cached)
        out.append(_target(f"{ft}: cached step >= 1.5x faster than mlx-lm-lora", _fmt(r, "{:.2f}x faster"), r and r >= 1.5))
        c, o, w = get(t, "cached", "mlx_peak_bytes"), get(t, "online", "mlx_peak_bytes"), get(t, "online", "ref_weight_bytes")
        ok = None if None in (c, o, w) else c <= o - 0.95 * w
        saved = None if None in (c, o, w) else f"{(o - c) / 1e9:.2f} GB saved of {w / 1e9:.2f} GB reference weights"
        out.append(_target(f"{ft}: peak <= online peak - 0.95x reference weights", saved or "n/a", ok))
        r = _ratio(c, get(t, "mlx_lm_lora", "mlx_peak_bytes"))
        out.append(_target(f"{ft}: peak <= 0.75x mlx-lm-lora's peak", _fmt(r, "{:.2f}x"), r and r <= 0.75))
    w = get(res, "padding", "ours_b4_x32")
    out.append(_target("padding waste <= 5% (batch 4, default pad to x32)", _fmt(w, "{:.1%}"), None if w is None else w <= 0.05))
    body, ours = get(res, "logps", "body", "extra_peak_bytes"), get(res, "logps", "ours_vocab", "extra_peak_bytes")
    vocab = res["shapes"]["bench-vocab"]["vocab_size"]
    seq = res["settings"]["logps_seq"]
    chunk = min(seq - 1, SRC_CHUNK_POSITIONS) * vocab * 4
    grow = None if None in (body, ours) else ours - body
    out.append(_target(f"log-prob peak above the body <= one chunk's logits ({chunk / 1e9:.2f} GB at V={vocab}, "
                       f"T={seq}: src chunks {SRC_CHUNK_POSITIONS} positions)",
                       _fmt(grow and grow / 1e9, "{:.2f} GB"), None if grow is None else grow <= chunk))
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
    rows = (("cached", "`mlx-dpo train` (cached reference)"), ("online", "same trainer, online reference (bench only)"),
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
    return lines


def _padding_table(res) -> list[str]:
    p = res["padding"]
    if "error" in p:
        return ["", f"**4. Padding waste**: not run: {p['error']}"]
    lines = ["", f"**4. Padding waste** (padded / total tokens) over {res['settings']['padding_pairs']:,} pairs with "
             "the bench's length distribution", "", "| batcher | batch 4 | batch 8 |", "|---|---:|---:|"]
    for x in (32, 8, 1):
        label = f"mlx-dpo `PairStream`, pad to x{x}" + (" (default)" if x == 32 else "")
        lines.append(f"| {label} | {p[f'ours_b4_x{x}']:.1%} | {p[f'ours_b8_x{x}']:.1%} |")
    for x in (32, 8):
        if f"ours_b4_split_x{x}" in p:
            lines.append(f"| candidate: chosen and rejected rows padded apart, x{x} | {p[f'ours_b4_split_x{x}']:.1%} | |")
    lines.append(f"| mlx-lm-lora (sorted by chosen length) | {p['mlx_lm_lora_b4']:.1%} | |")
    lines.append(f"| TRL (random batches) | {p['trl_b4']:.1%} | |")
    return lines


def _logps_table(res) -> list[str]:
    lg, s = res["logps"], res["settings"]
    v_small, v_big = res["shapes"]["bench-125m"]["vocab_size"], res["shapes"]["bench-vocab"]["vocab_size"]
    lines = ["", f"**5. Log-prob pass**, one sequence of {s['logps_seq']} tokens: peak memory above the loaded weights "
             "(GB), and seconds", "", f"| | V={v_small:,} | V={v_big:,} | seconds V={v_big:,} |", "|---|---:|---:|---:|"]
    body = lg.get("body")
    b = _gb(get(body, "extra_peak_bytes")) or _cell(body, "")
    lines.append(f"| transformer body only (no lm_head) | | {b} | {_cell(body, 'seconds')} |")
    for variant, label in (("ours", "`mlx_dpo.logps.sequence_logps`"), ("plain", "plain `log_softmax` over [B, T, V]"),
                           ("chunked", "lm_head + logsumexp per 256 positions (proposal)")):
        small, big = lg.get(f"{variant}_125m"), lg.get(f"{variant}_vocab")
        lines.append(f"| {label} | {_gb(get(small, 'extra_peak_bytes')) or _cell(small, '')} | "
                     f"{_gb(get(big, 'extra_peak_bytes')) or _cell(big, '')} | {_cell(big, 'seconds')} |")
    big = get(lg, "ours_vocab", "logits_bytes")
    lines.append(f"\nThe float32 logits alone are {_gb(big)} GB at V={v_big:,}. On given logits (temporaries only): "
                 f"`token_logps` {_gb(get(lg, 'token_logps_ours', 'extra_peak_bytes'))} GB, plain `log_softmax` "
                 f"{_gb(get(lg, 'token_logps_plain', 'extra_peak_bytes'))} GB.")
    sp = res.get("lse_speed", {})
    if "error" not in sp and sp:
        lines.append(f"Log-sum-exp over [{sp['rows']:,}, {sp['vocab']:,}]: `mx.logsumexp` {sp['mx_logsumexp_s']:.3f} s, "
                     f"compiled max/exp/sum {sp['mx_compiled_s']:.3f} s, numpy {sp['numpy_lse_s']:.3f} s; exp alone "
                     f"{sp['mx_exp_melem_per_s']:.0f} M elements/s in MLX vs {sp['numpy_exp_melem_per_s']:.0f} M in numpy.")
    return lines


def _variants_table(res) -> list[str]:
    fv, tv = res.get("forward_variants"), res.get("train_variants")
    if not fv:
        return []
    if "error" in fv:
        return ["", f"**6. Candidate changes to src**: not run: {fv['error']}"]
    lines = ["", f"**6. Candidate changes to src**, measured against src in one process, runs interleaved; fastest of "
             f"{fv['reps']}. Precompute forward, bench-125m, {fv['rows']} x {fv['seq']} tokens (prompt = first third):", "",
             "| variant | seconds | vs src | max abs diff of log-probs |", "|---|---:|---:|---:|"]
    for name, label in (("src", "`sequence_logps` as in src"), ("compiled", "`mx.compile`d `sequence_logps`"),
                        ("chunked", "lm_head + logsumexp per 256 positions, evaluated per chunk"),
                        ("numpy_normaliser", "vocabulary log-sum-exp in numpy"),
                        ("completion_only", "lm_head + log-sum-exp at completion positions only"),
                        ("two_streams", "half the batch on each of 2 CPU streams, BLAS 1 thread"),
                        ("two_streams_completion_only", "2 streams + completion positions only")):
        if f"{name}_s" in fv:
            lines.append(f"| {label} | {fv[f'{name}_s']:.3f} | {fv[f'{name}_vs_src']:.2f}x | {fv[f'{name}_max_abs_diff']:.1e} |")
    if tv and "error" not in tv:
        lines += ["", f"Train step ({tv['fine_tune']}, 4 pairs, compiled; widths {tv['widths']}):", "",
                  "| variant | s/step | vs src | peak GB |", "|---|---:|---:|---:|"]
        for name, label in (("src", "as in src (pad to x32)"), ("pad_x8", "pad to x8"),
                            ("completion_only", "completion positions only"),
                            ("pad_x8_completion_only", "pad to x8 + completion positions only")):
            lines.append(f"| {label} | {tv[f'{name}_s']:.2f} | {tv[f'{name}_vs_src']:.2f}x | {_gb(tv.get(f'{name}_peak_bytes'))} |")
    elif tv:
        lines.append(f"\nTrain step variants: not run: {tv['error']}")
    return lines
