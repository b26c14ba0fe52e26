"""PAPO / GRPO / DAPO losses as pure functions of per-token tensors (verl `core_algos` style).

Shapes: every per-token tensor is [B, T] over response positions; `response_mask` is a float [B, T] that is 1
on response tokens and 0 on padding; advantages are [B] (one per sequence) or [B, T].

    loss = agg(L_pg) − γ·agg(KL_prcp) + η1·agg(H_orig) + η2·agg(H_mask) + β·agg(KL_ref)

KL_prcp = KL(π_θ(·|q,I) ‖ π_θ(·|q,I_mask)) per token; H = entropy (or the authors' NLL stand-in);
KL_ref = KL(π_θ ‖ π_ref). See ../../shared/reference/papo-algorithm.md for the authors' exact computation,
reproduced by `AlgoConfig.official=True` (see `loss_settings`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from papo_engine.config import AlgoConfig

KL_KINDS = ("k1", "k2", "k3")
PERCEPTION_KL_KINDS = ("k1", "k2", "k3", "full")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ENTROPY_FORMS = ("nll", "full")

# verl / EasyR1 "low_var_kl" clamps, used by the authors for both the perception and the reference KL
OFFICIAL_LOG_RATIO_CLAMP = 20.0
OFFICIAL_K3_CLAMP = 10.0
# verl clamps the PPO log-ratio log π − log π_old to ±20 before exp() (overflow guard; inactive in practice)
PPO_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------------------
# KL estimators


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: str, official: bool = False) -> Tensor:
    """Per-token sample estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman's k1/k2/k3).

        k1 = logp − logp_ref
        k2 = ½ (logp − logp_ref)²
        k3 = exp(logp_ref − logp) − (logp_ref − logp) − 1          (unbiased, always >= 0)

    official=True (k3 only): verl/EasyR1 "low_var_kl" as the authors run it —
        d = clamp(logp_ref − logp, −20, 20);  k3 = clamp(exp(d) − d − 1, −10, 10).
    """
    if kind == "k1":
        return logp - logp_ref
    if kind == "k2":
        return 0.5 * (logp - logp_ref).square()
    if kind == "k3":
        d = logp_ref - logp
        if official:
            d = d.clamp(-OFFICIAL_LOG_RATIO_CLAMP, OFFICIAL_LOG_RATIO_CLAMP)
            return (torch.exp(d) - d - 1.0).clamp(-OFFICIAL_K3_CLAMP, OFFICIAL_K3_CLAMP)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl kind={kind!r}: must be one of {', '.join(KL_KINDS)}")


def perception_kl(logprobs: Tensor, masked_logprobs: Tensor | None, kind: str, full_kl: Tensor | None = None,
                  clamp: float | None = None, official: bool = False) -> Tensor:
    """Per-token perception KL, KL(π_θ(·|q,I) ‖ π_θ(·|q,I_mask)), [B, T].

    kind k1/k2/k3: `kl_estimate(logprobs, masked_logprobs, kind)` on the sampled token o_t ~ π(·|q,I), e.g.
        k3 = exp(logp_m − logp) − (logp_m − logp) − 1.
    kind "full": the exact full-vocabulary Σ_v p(v)·(log p(v) − log p_m(v)), computed by the fused head and
        passed in as `full_kl` (this function only returns it, clamped if asked).
    official=True: the authors' computation regardless of `kind` —
        d = clamp(logp_m − logp, −20, 20);  k3 = exp(d) − d − 1;  k3 = clamp(k3, −10, 10).
    clamp=c: finally clamp to [0, c] (the authors' optional extra clamp; off when None).
    """
    if official:
        kind = "k3"
    if kind == "full":
        if full_kl is None:
            raise ValueError("perception_kl kind='full' needs full_kl (the fused head's full-vocabulary KL)")
        kl = full_kl
    elif kind in KL_KINDS:
        if masked_logprobs is None:
            raise ValueError(f"perception_kl kind={kind!r} needs masked_logprobs")
        kl = kl_estimate(logprobs, masked_logprobs, kind, official=official)
    else:
        raise ValueError(f"perception_kl kind={kind!r}: must be one of {', '.join(PERCEPTION_KL_KINDS)}")
    if clamp is not None:
        kl = kl.clamp(0.0, clamp)
    return kl


# ----------------------------------------------------------------------------------------------------------
# aggregation


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """values·mask with padding forced to exactly 0 (no NaN/inf leakage from garbage at padded positions)."""
    return values.masked_fill(mask <= 0, 0.0) * mask


def aggregate(values: Tensor, mask: Tensor, mode: str, token_normalizer: Tensor | float | None = None,
              seq_normalizer: Tensor | float | None = None) -> Tensor:
    """Reduce a per-token [B, T] tensor to a scalar over response tokens.

        token-mean:          Σ_{b,t} v·m / N_tok                     N_tok defaults to Σ m
        seq-mean-token-mean: Σ_b (Σ_t v·m / Σ_t m) / N_seq           N_seq defaults to B
        seq-mean-token-sum:  Σ_b (Σ_t v·m) / N_seq

    Pass the GLOBAL normalizer (tokens, or sequences, of the whole mini-batch over all micro-batches and ranks,
    divided by the number of ranks when gradients are averaged across ranks) so that summing the micro-batch
    losses gives the same gradient however the batch is split. Sequences with no response token contribute 0.
    """
    vm = _masked(values, mask)
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1.0) if token_normalizer is None else token_normalizer
        return vm.sum() / denom
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_seq = vm.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(dim=-1).clamp(min=1.0)
        denom = values.shape[0] if seq_normalizer is None else seq_normalizer
        return per_seq.sum() / denom
    raise ValueError(f"loss_agg={mode!r}: must be one of {', '.join(AGG_MODES)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ v·m / Σ m over response tokens (0 when there are none)."""
    return _masked(values, mask).sum() / mask.sum().clamp(min=1.0)


def seq_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence token mean, [B]: Σ_t v·m / Σ_t m."""
    return _masked(values, mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------
# policy gradient


def policy_gradient_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                         clip_low: float, clip_high: float, dual_clip: float | None = None
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric (DAPO clip-higher) and optional dual clipping, per token [B, T].

        r   = exp(clamp(logp − logp_old, −20, 20))
        L   = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))
        dual-clip (c > 1, as verl):  L = min(L, −A·c)  where A < 0   (bounds the loss when r ≫ 1 and A < 0)

    Metrics (detached token-means over response tokens): pg_clipfrac (the clipped branch is active),
    ppo_kl (mean of logp_old − logp, approx KL(old‖new)), pg_clipfrac_lower (dual clip active; only with c).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    log_ratio = (logprobs - old_logprobs).clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    metrics = {}
    with torch.no_grad():
        metrics["pg_clipfrac"] = masked_mean(torch.gt(loss2, loss1).to(mask_dtype(response_mask)), response_mask)
        metrics["ppo_kl"] = masked_mean(-log_ratio, response_mask)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip}: must be > 1")
        loss3 = -adv * dual_clip
        negative = adv < 0
        with torch.no_grad():
            lower = torch.gt(clipped, loss3) & negative
            metrics["pg_clipfrac_lower"] = masked_mean(lower.to(mask_dtype(response_mask)), response_mask)
        clipped = torch.where(negative, torch.minimum(clipped, loss3), clipped)
    return clipped, metrics


def mask_dtype(mask: Tensor) -> torch.dtype:
    return mask.dtype if mask.is_floating_point() else torch.get_default_dtype()


# ----------------------------------------------------------------------------------------------------------
# entropy and γ


def entropy_term(logprobs: Tensor | None, entropy: Tensor | None, form: str) -> Tensor:
    """Per-token entropy used by the double-entropy loss.

        nll:  −log π(o_t)        (the authors' "entropy": mean NLL of the sampled tokens, an estimate of H)
        full: H(π(·|·)) = −Σ_v p(v) log p(v), computed by the fused head and passed in as `entropy`
    """
    if form == "nll":
        if logprobs is None:
            raise ValueError("entropy form 'nll' needs log-probs")
        return -logprobs
    if form == "full":
        if entropy is None:
            raise ValueError("entropy form 'full' needs the full-vocabulary entropy tensor")
        return entropy
    raise ValueError(f"entropy_form={form!r}: must be one of {', '.join(ENTROPY_FORMS)}")


def gamma_at(step: int, total_steps: int, cfg: AlgoConfig) -> float:
    """Perception-KL weight γ at a 0-based `step` of `total_steps`.

        constant: γ = cfg.gamma
        linear:   γ = cfg.gamma + (cfg.gamma_final − cfg.gamma) · step / (total_steps − 1)
                  (γ at step 0 is cfg.gamma, at the last step cfg.gamma_final; step is clamped into range)
    """
    if cfg.gamma_schedule == "constant":
        return float(cfg.gamma)
    if cfg.gamma_schedule == "linear":
        frac = min(max(step, 0), max(total_steps - 1, 1)) / max(total_steps - 1, 1)
        return float(cfg.gamma + (cfg.gamma_final - cfg.gamma) * frac)
    raise ValueError(f"gamma_schedule={cfg.gamma_schedule!r}: must be constant or linear")


# ----------------------------------------------------------------------------------------------------------
# the PAPO loss


@dataclass
class LossInputs:
    """Per-token inputs of one (micro-)batch, all [B, T] except `advantages` ([B] or [B, T]).

    logprobs / entropy / full_kl carry autograd (current policy); old_logprobs and ref_logprobs are constants.
    masked_* come from the masked-image branch (with grad in the default mode, precomputed without grad when
    `masked_grad` is off / `official`). full_kl is the exact full-vocab KL(π‖π_mask) from the fused head.
    """
    logprobs: Tensor
    old_logprobs: Tensor
    response_mask: Tensor
    advantages: Tensor
    masked_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    masked_entropy: Tensor | None = None
    full_kl: Tensor | None = None
    ref_logprobs: Tensor | None = None
    # rollout IS correction (rollout_correction.rollout_is_weights): per-token constants on the pg loss
    rollout_is_weights: Tensor | None = None


class LossSettings(NamedTuple):
    """The loss choices actually in effect after the `official` override (the trainer reads masked_grad etc.)."""
    perception_kl: str
    perception_kl_clamp: float | None
    entropy_form: str
    loss_agg: str
    masked_grad: bool
    official: bool


def loss_settings(cfg: AlgoConfig) -> LossSettings:
    """Resolve `cfg` into the effective loss choices.

    official=True forces the authors' computation whatever the other fields say: perception KL = k3 with the
    ±20 / ±10 clamps, entropy = NLL of sampled tokens, token-mean aggregation, no gradient through the masked
    branch. Still honoured: clip ratios, dual-clip, β and its estimator (k3 also gets the verl clamps), η1/η2,
    γ, and perception_kl_clamp (the authors' optional [0, c] clamp, off in all their scripts: a validated config
    refuses it, and the forced fields too when they differ — `config.OFFICIAL_SETTINGS`). The authors normalize
    the token-mean per micro-batch and divide by the gradient-accumulation count: to reproduce that, the trainer passes
    token_normalizer = (local response tokens) × (accumulation steps).
    """
    if cfg.official:
        return LossSettings("k3", cfg.perception_kl_clamp, "nll", "token-mean", False, True)
    return LossSettings(cfg.perception_kl, cfg.perception_kl_clamp, cfg.entropy_form, cfg.loss_agg,
                        cfg.masked_grad, False)


def papo_loss(inputs: LossInputs, cfg: AlgoConfig, gamma: float, token_normalizer: Tensor | float | None = None,
              seq_normalizer: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PAPO objective for one micro-batch (GRPO when γ = η1 = η2 = 0; DAPO when additionally β = 0).

        loss = agg(L_pg) − γ·agg(KL_prcp) + η1·agg(H_orig) + η2·agg(H_mask) + β·agg(KL_ref)

    L_pg: `policy_gradient_loss` (ε_low = cfg.clip_ratio_low, ε_high = cfg.clip_ratio_high, cfg.dual_clip);
    KL_prcp: `perception_kl` (cfg.perception_kl, cfg.perception_kl_clamp); H: `entropy_term`
    (cfg.entropy_form) with η1 = cfg.eta_orig, η2 = cfg.eta_mask; KL_ref: `kl_estimate(logp, logp_ref,
    cfg.ref_kl_estimator)` with β = cfg.ref_kl_coef; agg: `aggregate(·, cfg.loss_agg, normalizers)`.
    `gamma` is passed in (see `gamma_at`); cfg.gamma is not read here. See `loss_settings` for `official`.

    Masked-branch gradient: with masked_grad off (or official) masked_logprobs and masked_entropy are detached
    here. `full_kl` is a single tensor depending on both branches and cannot be partially detached: with
    masked_grad off and perception_kl="full" the caller must compute it with the masked branch's inputs
    detached.

    A term whose coefficient is 0 is not computed into the loss, so with γ = η1 = η2 = 0 the loss is exactly
    the GRPO loss agg(L_pg) + β·agg(KL_ref), whatever the masked inputs hold. Padding positions of every
    per-token input are replaced by 0 before use, so garbage (inf/NaN) there never reaches loss or gradient.

    Metrics (detached, normalized over this call's response tokens only — independent of the normalizers):
    pg_loss, pg_clipfrac, ppo_kl, [pg_clipfrac_lower], [ref_kl], and when the masked branch is given:
    perception_kl (token-mean), perception_kl_per_seq ([B], per-sequence mean KL_prcp: perception reliance),
    entropy, masked_entropy (token-mean of the chosen form; NLL when full entropies are absent).
    """
    s = loss_settings(cfg)
    mask = inputs.response_mask
    if not mask.is_floating_point():
        mask = mask.to(inputs.logprobs.dtype)
    pad = mask <= 0

    def clean(x: Tensor | None, detach: bool = False) -> Tensor | None:
        if x is None:
            return None
        x = x.detach() if detach else x
        return x.masked_fill(pad, 0.0)

    logp = clean(inputs.logprobs)
    old = clean(inputs.old_logprobs, detach=True)
    ref = clean(inputs.ref_logprobs, detach=True)
    no_mgrad = not s.masked_grad
    mlogp = clean(inputs.masked_logprobs, detach=no_mgrad)
    ent = clean(inputs.entropy)
    ment = clean(inputs.masked_entropy, detach=no_mgrad)
    full_kl = clean(inputs.full_kl)

    def agg(values: Tensor) -> Tensor:
        return aggregate(values, mask, s.loss_agg, token_normalizer, seq_normalizer)

    pg_tok, metrics = policy_gradient_loss(logp, old, inputs.advantages, mask, cfg.clip_ratio_low,
                                           cfg.clip_ratio_high, cfg.dual_clip)
    if inputs.rollout_is_weights is not None:  # off-policy correction for the rollout engine's sampler
        pg_tok = pg_tok * clean(inputs.rollout_is_weights, detach=True)
    loss = agg(pg_tok)
    with torch.no_grad():
        metrics["pg_loss"] = aggregate(pg_tok, mask, s.loss_agg)

    if cfg.ref_kl_coef > 0:
        if ref is None:
            raise ValueError("ref_kl_coef > 0 needs ref_logprobs")
        ref_tok = kl_estimate(logp, ref, cfg.ref_kl_estimator, official=s.official)
        loss = loss + cfg.ref_kl_coef * agg(ref_tok)
        metrics["ref_kl"] = masked_mean(ref_tok.detach(), mask)

    def prcp_kl() -> Tensor:
        return perception_kl(logp, mlogp, s.perception_kl, full_kl=full_kl, clamp=s.perception_kl_clamp,
                             official=s.official)

    def entropies(form: str) -> tuple[Tensor, Tensor | None]:
        h = entropy_term(logp, ent, form)
        hm = entropy_term(mlogp, ment, form) if (mlogp is not None or ment is not None) else None
        return h, hm

    # --- PAPO terms: only those with a non-zero coefficient touch the loss ---
    if gamma != 0:
        loss = loss - gamma * agg(prcp_kl())
    if cfg.eta_orig != 0 or cfg.eta_mask != 0:
        h, hm = entropies(s.entropy_form)
        if cfg.eta_orig != 0:
            loss = loss + cfg.eta_orig * agg(h)
        if cfg.eta_mask != 0:
            if hm is None:
                raise ValueError("eta_mask > 0 needs the masked branch (masked_logprobs or masked_entropy)")
            loss = loss + cfg.eta_mask * agg(hm)

    # --- monitoring (never part of the loss) ---
    with torch.no_grad():
        has_masked = full_kl is not None if s.perception_kl == "full" else mlogp is not None
        if has_masked:
            kl_tok = prcp_kl()
            metrics["perception_kl"] = masked_mean(kl_tok, mask)
            metrics["perception_kl_per_seq"] = seq_mean(kl_tok, mask)
        form = s.entropy_form if (s.entropy_form == "nll" or ent is not None) else "nll"
        h = entropy_term(logp, ent, form)
        metrics["entropy"] = masked_mean(h, mask)
        mform = s.entropy_form if (s.entropy_form == "nll" or ment is not None) else "nll"
        if mlogp is not None or (mform == "full" and ment is not None):
            metrics["masked_entropy"] = masked_mean(entropy_term(mlogp, ment, mform), mask)
    return loss, metrics
