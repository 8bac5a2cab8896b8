"""Preference losses from sequence log-probs: one small pure function per loss.

Formulas follow TRL's DPOTrainer (trl/trainer/dpo_trainer.py, v1.16) unless a docstring says
otherwise. Every function maps a `Pairs` to per-example losses; rejected arrays may be (B,) or
(B, K) (several rejected answers per prompt), chosen arrays broadcast as (B, 1).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx


def log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(0.0, -x)  # stable for large |x|


@dataclass(frozen=True)
class Pairs:
    policy_chosen: mx.array  # (B,) or (B, 1): summed log-probs of the chosen completion
    policy_rejected: mx.array  # (B,) or (B, K)
    ref_chosen: mx.array
    ref_rejected: mx.array
    chosen_lengths: mx.array | None = None  # completion tokens scored
    rejected_lengths: mx.array | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    options: dict = field(default_factory=dict)

    @property
    def chosen_logratios(self) -> mx.array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> mx.array:
        return self.policy_rejected - self.ref_rejected

    def score_gap(self, chosen_weight=1.0, rejected_weight=1.0) -> mx.array:
        """w_c·f'(t_c) - w_r·f'(t_r) for the f-divergence's f' of the ratios t = π/π_ref (reverse KL: the
        log-ratios), without forming an exponential that overflows (see `_exponential_gap`)."""
        divergence = self.options.get("f_divergence_type", "reverse_kl")
        chosen, rejected = self.chosen_logratios, self.rejected_logratios
        alpha = self.options.get("f_alpha_divergence_coef", 0.5)
        if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
            return chosen_weight * chosen - rejected_weight * rejected  # α = 1: the limit is log t
        if divergence == "js_divergence":
            score = lambda r: math.log(2) + log_sigmoid(r)  # noqa: E731
            return chosen_weight * score(chosen) - rejected_weight * score(rejected)
        if divergence == "forward_kl":  # f'(t) = 1 - e^{-r}
            return (chosen_weight - rejected_weight) - _exponential_gap(-chosen, -rejected, chosen_weight, rejected_weight)
        if divergence == "alpha_divergence":  # f'(t) = (e^{(α-1)r} - 1)/(α-1), exponent capped as TRL's
            c = 1.0 / (alpha - 1.0)
            x_c, x_r = (mx.minimum((alpha - 1.0) * r, TRL_ALPHA_CAP) for r in (chosen, rejected))
            return c * (_exponential_gap(x_c, x_r, chosen_weight, rejected_weight) - (chosen_weight - rejected_weight))
        raise ValueError(f"unknown f_divergence_type {divergence!r}; one of {', '.join(F_DIVERGENCES)}")

    def delta_score(self) -> mx.array:
        return self.score_gap()

    def lengths(self) -> tuple[mx.array, mx.array]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("this loss needs chosen_lengths and rejected_lengths (completion token counts)")
        return mx.maximum(self.chosen_lengths, 1), mx.maximum(self.rejected_lengths, 1)


# ---- f-divergences (Wang et al. 2023, "Beyond Reverse KL"): f'(t) of the ratio t = π/π_ref ----
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL caps the alpha-divergence exponent (α-1)·r at 80 in float32; we do the same, so we equal it there.
TRL_ALPHA_CAP = 80.0
# A difference of exponentials is scaled by at most e^80 ≈ 5.5e34 (TRL's values past that are inf or nan
# in float32 for forward_kl): per-pair losses and their batch sums stay finite, never flat.
GAP_CAP = 80.0
# The squared base of ipo is kept within ±1e17: its square and batch sums stay finite in float32.
SQUARE_CAP = 1e17


def _exponential_gap(x_c: mx.array, x_r: mx.array, w_c, w_r) -> mx.array:
    """w_c·e^{x_c} - w_r·e^{x_r}, as e^m·(w_c·e^{x_c-m} - w_r·e^{x_r-m}) with m the larger exponent: exact
    (and its gradient too) while m <= GAP_CAP; past it e^m is held at e^GAP_CAP, so the value stays finite
    and keeps the sign and slope of the true gap rather than flattening to 0."""
    m = mx.stop_gradient(mx.maximum(x_c, x_r))
    return mx.exp(mx.minimum(m, GAP_CAP)) * (w_c * mx.exp(x_c - m) - w_r * mx.exp(x_r - m))


# Losses normalised per completion token rather than per pair: weighted by global token counts.
TOKEN_LOSSES = {"sft"}

LOSSES: dict[str, Callable[[Pairs], mx.array]] = {}


def register(name: str):
    def add(fn):
        LOSSES[name] = fn
        return fn

    return add


def _conservative(logits: mx.array, eps: float) -> mx.array:
    if eps == 0:  # no 0·logσ(-x) term: it is 0·(-inf) = nan where x is +inf
        return -log_sigmoid(logits)
    return -(1 - eps) * log_sigmoid(logits) - eps * log_sigmoid(-logits)


@register("sigmoid")
def sigmoid_loss(p: Pairs) -> mx.array:
    """DPO (Rafailov et al. 2023, eq. 7); label_smoothing ε gives conservative DPO (Mitchell 2023):
    -(1-ε)·logσ(βx) - ε·logσ(-βx). TRL dropped the ε form; we keep it."""
    return _conservative(p.beta * p.delta_score(), p.label_smoothing)


@register("hinge")
def hinge_loss(p: Pairs) -> mx.array:
    """SLiC (Zhao et al. 2023): relu(1 - βx)."""
    return mx.maximum(1 - p.beta * p.delta_score(), 0.0)


@register("ipo")
def ipo_loss(p: Pairs) -> mx.array:
    """IPO (Azar et al. 2023, eq. 17), on per-token averages as TRL: (x̄ - 1/(2β))²."""
    chosen_len, rejected_len = p.lengths()
    base = p.score_gap(1 / chosen_len, 1 / rejected_len) - 1 / (2 * p.beta)
    return mx.clip(base, -SQUARE_CAP, SQUARE_CAP) ** 2  # TRL's square is inf past ~1.8e19


@register("exo_pair")
def exo_pair_loss(p: Pairs) -> mx.array:
    """EXO (Ji et al. 2024, eq. 16): KL(softmax(βx) || [1-ε, ε]) over {chosen, rejected}."""
    eps = p.label_smoothing
    if eps <= 0:  # log ε: TRL 1.16 refuses ε = 0 too
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    logits = p.beta * p.delta_score()
    win, lose = mx.sigmoid(logits), mx.sigmoid(-logits)
    return win * (log_sigmoid(logits) - math.log1p(-eps)) + lose * (log_sigmoid(-logits) - math.log(eps))


@register("nca_pair")
def nca_pair_loss(p: Pairs) -> mx.array:
    """NCA (Chen et al. 2024): -logσ(r_c) - ½logσ(-r_c) - ½logσ(-r_r), r = β·log-ratio."""
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)


@register("robust")
def robust_loss(p: Pairs) -> mx.array:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate ε < 0.5."""
    logits, eps = p.beta * p.delta_score(), p.label_smoothing
    return (-(1 - eps) * log_sigmoid(logits) + eps * log_sigmoid(-logits)) / (1 - 2 * eps)


@register("bco_pair")
def bco_pair_loss(p: Pairs) -> mx.array:
    """BCO pair form (Jung et al. 2024), without the running reward shift: -logσ(r_c) - logσ(-r_r)."""
    return -log_sigmoid(p.beta * p.chosen_logratios) - log_sigmoid(-p.beta * p.rejected_logratios)


@register("sppo_hard")
def sppo_hard_loss(p: Pairs) -> mx.array:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7): (ρ_c - ½β⁻¹)² + (ρ_r + ½β⁻¹)²."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _sorted_pair_loss(delta: mx.array, p: Pairs) -> mx.array:
    return _conservative(p.beta * delta, p.label_smoothing)


@register("aot")
def aot_loss(p: Pairs) -> mx.array:
    """AOT paired (Melnyk et al. 2024): sort policy and reference log-ratio gaps across the batch."""
    policy = mx.sort(p.policy_chosen - p.policy_rejected, axis=0)
    ref = mx.sort(p.ref_chosen - p.ref_rejected, axis=0)
    return _sorted_pair_loss(policy - ref, p)


@register("aot_unpaired")
def aot_unpaired_loss(p: Pairs) -> mx.array:
    """AOT unpaired: sort chosen and rejected log-ratios independently across the batch."""
    chosen = mx.sort(mx.broadcast_to(p.chosen_logratios, p.rejected_logratios.shape), axis=0)
    return _sorted_pair_loss(chosen - mx.sort(p.rejected_logratios, axis=0), p)


@register("apo_zero")
def apo_zero_loss(p: Pairs) -> mx.array:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected."""
    return 1 - mx.sigmoid(p.beta * p.chosen_logratios) + mx.sigmoid(p.beta * p.rejected_logratios)


@register("apo_down")
def apo_down_loss(p: Pairs) -> mx.array:
    """APO-down (eq. 8): lower chosen, lower rejected more."""
    chosen = p.chosen_logratios
    return mx.sigmoid(p.beta * chosen) + 1 - mx.sigmoid(p.beta * (chosen - p.rejected_logratios))


@register("discopop")
def discopop_loss(p: Pairs) -> mx.array:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): logistic/exponential blend gated by σ(βx/τ)."""
    logits, tau = p.beta * p.delta_score(), p.options.get("discopop_tau", 0.05)
    # e^{-x}·σ(x/τ) as one exponent: the product is inf·0 = nan where x is very negative. The exponent
    # stays below ~0 for τ <= 1; for τ > 1 it grows past TRL's finite range (e^88), and is capped there.
    exponential = mx.exp(mx.minimum(-logits + log_sigmoid(logits / tau), GAP_CAP))
    return -log_sigmoid(logits) * mx.sigmoid(-logits / tau) + exponential


@register("sigmoid_norm")
def sigmoid_norm_loss(p: Pairs) -> mx.array:
    """DPO on per-token average scores: -logσ(β(s_c/|y_c| - s_r/|y_r|))."""
    chosen_len, rejected_len = p.lengths()
    return -log_sigmoid(p.beta * p.score_gap(1 / chosen_len, 1 / rejected_len))


@register("simpo")
def simpo_loss(p: Pairs) -> mx.array:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -logσ(β·(logπ_c/|y_c| - logπ_r/|y_r|) - γ)."""
    chosen_len, rejected_len = p.lengths()
    margin = p.policy_chosen / chosen_len - p.policy_rejected / rejected_len
    return _conservative(p.beta * margin - p.options.get("simpo_gamma", 0.5), p.label_smoothing)


@register("sft")
def sft_loss(p: Pairs) -> mx.array:
    """NLL of the chosen completions, token mean over the batch (TRL's `sft`; RPO's NLL term)."""
    chosen_len, _ = p.lengths()
    return mx.broadcast_to(-p.policy_chosen.sum() / chosen_len.sum(), p.policy_rejected.shape)


def plackett_luce_loss(p: Pairs) -> mx.array:
    """One chosen vs K rejected, softmax / Plackett-Luce top-1 (S-DPO, Chen et al. 2024):
    log(1 + Σ_j exp(h_j - h_w)), h = β·score. At K = 1 this is -logσ(h_w - h_l), i.e. DPO."""
    gaps = -p.beta * p.delta_score()  # (B, K): h_j - h_w
    return mx.logsumexp(mx.concatenate([mx.zeros((gaps.shape[0], 1)), gaps], axis=1), axis=1)


REJECTED_AGGREGATIONS = ("pairwise", "softmax")


def split_token_losses(loss_type, loss_weights=None) -> tuple[list[str], list[float], float]:
    """(per-pair loss types, their weights, summed weight of the per-token ones): a step weights the
    first by its global pair count and the second by its global count of chosen completion tokens."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights or [1.0] * len(types))
    pairs = [(t, w) for t, w in zip(types, weights) if t not in TOKEN_LOSSES]
    token_weight = sum(w for t, w in zip(types, weights) if t in TOKEN_LOSSES)
    return [t for t, _ in pairs], [w for _, w in pairs], float(token_weight)
OPTION_NAMES = {"f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma"}


def _column(x) -> mx.array | None:
    """(B,) -> (B, 1); (B, K) unchanged."""
    if x is None:
        return None
    x = mx.array(x) if not isinstance(x, mx.array) else x
    return x[:, None] if x.ndim == 1 else x


def make_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
               beta=0.1, label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
               reference_free=False, **options) -> Pairs:
    """Pairs in (B, 1) chosen / (B, K) rejected form; missing references (or reference_free) mean 0."""
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise ValueError(f"unknown loss option(s): {', '.join(sorted(unknown))}")
    policy_chosen, policy_rejected = _column(policy_chosen_logps), _column(policy_rejected_logps)
    if reference_free or ref_chosen_logps is None or ref_rejected_logps is None:
        ref_chosen, ref_rejected = mx.zeros_like(policy_chosen), mx.zeros_like(policy_rejected)
    else:
        ref_chosen, ref_rejected = _column(ref_chosen_logps), _column(ref_rejected_logps)
    return Pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, _column(chosen_lengths),
                 _column(rejected_lengths), beta, label_smoothing, options)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, chosen_lengths=None,
                    rejected_lengths=None, **options) -> mx.array:
    """Per-example preference loss, shape (B,).

    Args:
        policy_chosen_logps: (B,) summed completion log-probs under the policy.
        policy_rejected_logps: (B,) or (B, K) for K rejected answers per prompt.
        ref_chosen_logps, ref_rejected_logps: the same under the reference; None for reference-free.
        loss_type: a name from LOSSES, or a list of names combined with `loss_weights` (TRL's way).
        chosen_lengths, rejected_lengths: completion token counts, for length-normalised losses.
        options: loss_weights, rejected_aggregation ("pairwise" mean over K, or "softmax":
            Plackett-Luce top-1, sigmoid only), reference_free, f_divergence_type,
            f_alpha_divergence_coef, discopop_tau, simpo_gamma.

    Example: preference_loss(mx.array([-2.0]), mx.array([-3.0]), mx.array([-2.5]), mx.array([-2.5]), beta=0.5)
    -> [0.474077] (= ln(1 + e^-0.5)).
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = options.pop("loss_weights", None) or [1.0] * len(types)
    aggregation = options.pop("rejected_aggregation", "pairwise")
    if len(weights) != len(types):
        raise ValueError(f"{len(types)} loss types but {len(weights)} loss_weights")
    if aggregation not in REJECTED_AGGREGATIONS:
        raise ValueError(f"rejected_aggregation must be one of {REJECTED_AGGREGATIONS}, got {aggregation!r}")
    pairs = make_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       beta=beta, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                       rejected_lengths=rejected_lengths, **options)
    total = 0.0
    for name, weight in zip(types, weights):
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; one of {', '.join(sorted(LOSSES))}")
        if aggregation == "softmax" and name != "sft":
            if name != "sigmoid":
                raise ValueError(f"rejected_aggregation='softmax' is defined for 'sigmoid', not {name!r}")
            total = total + weight * plackett_luce_loss(pairs)
        else:
            total = total + weight * LOSSES[name](pairs).mean(axis=1)
    return total
