"""Advantages, KL estimators, policy and PAPO losses against independent float64 references written here from
the formulas (plain Python loops and `math`), hand-computed examples, and float64 gradchecks."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from papo_engine.algorithms import (
    LossInputs,
    aggregate,
    entropy_term,
    gamma_at,
    group_advantages,
    informative_groups,
    kl_estimate,
    loss_settings,
    overlong_penalty,
    papo_loss,
    perception_kl,
    policy_gradient_loss,
)
from papo_engine.config import AlgoConfig

# ----------------------------------------------------------------------------------------------------------
# independent references (float64, loops)


def ref_kl(a: float, b: float, kind: str, official: bool = False) -> float:
    """Sample estimate of KL(p_a || p_b) at one token, log-probs a (sampling policy) and b."""
    if kind == "k1":
        return a - b
    if kind == "k2":
        return 0.5 * (a - b) ** 2
    d = b - a
    if official:
        d = min(max(d, -20.0), 20.0)
    v = math.exp(d) - d - 1.0
    if official:
        v = min(max(v, -10.0), 10.0)
    return v


def ref_pg(lp: float, old: float, adv: float, clip_low: float, clip_high: float, dual) -> float:
    r = math.exp(min(max(lp - old, -20.0), 20.0))
    loss = max(-adv * r, -adv * min(max(r, 1.0 - clip_low), 1.0 + clip_high))
    if dual is not None and adv < 0:
        loss = min(loss, -adv * dual)
    return loss


def ref_agg(vals, mask, mode, tok_norm=None, seq_norm=None) -> float:
    B, T = len(vals), len(vals[0])
    if mode == "token-mean":
        n = tok_norm if tok_norm is not None else max(sum(sum(row) for row in mask), 1.0)
        return sum(vals[b][t] * mask[b][t] for b in range(B) for t in range(T) if mask[b][t] > 0) / n
    total = 0.0
    for b in range(B):
        s = sum(vals[b][t] * mask[b][t] for t in range(T) if mask[b][t] > 0)
        if mode == "seq-mean-token-mean":
            s /= max(sum(mask[b]), 1.0)
        total += s
    return total / (seq_norm if seq_norm is not None else B)


def ref_papo(inp: dict, cfg: AlgoConfig, gamma: float, tok_norm=None, seq_norm=None) -> float:
    """The PAPO loss from the formulas; `official` resolved by hand (k3+clamps, NLL, token-mean)."""
    official = cfg.official
    kind = "k3" if official else cfg.perception_kl
    eform = "nll" if official else cfg.entropy_form
    mode = "token-mean" if official else cfg.loss_agg
    L = {k: (v.double().tolist() if torch.is_tensor(v) else v) for k, v in inp.items()}
    mask = L["response_mask"]
    B, T = len(mask), len(mask[0])

    def per_tok(f):
        return [[f(b, t) if mask[b][t] > 0 else 0.0 for t in range(T)] for b in range(B)]

    def agg(vals):
        return ref_agg(vals, mask, mode, tok_norm, seq_norm)

    loss = agg(per_tok(lambda b, t: ref_pg(L["logprobs"][b][t], L["old_logprobs"][b][t], L["advantages"][b],
                                           cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.dual_clip)))
    if cfg.ref_kl_coef > 0:
        loss += cfg.ref_kl_coef * agg(per_tok(lambda b, t: ref_kl(L["logprobs"][b][t], L["ref_logprobs"][b][t],
                                                                 cfg.ref_kl_estimator, official)))
    if gamma != 0:
        def kl(b, t):
            v = L["full_kl"][b][t] if kind == "full" else ref_kl(L["logprobs"][b][t], L["masked_logprobs"][b][t],
                                                                 kind, official)
            if cfg.perception_kl_clamp is not None:
                v = min(max(v, 0.0), cfg.perception_kl_clamp)
            return v
        loss -= gamma * agg(per_tok(kl))
    if cfg.eta_orig:
        key, sign = ("logprobs", -1.0) if eform == "nll" else ("entropy", 1.0)
        loss += cfg.eta_orig * agg(per_tok(lambda b, t: sign * L[key][b][t]))
    if cfg.eta_mask:
        key, sign = ("masked_logprobs", -1.0) if eform == "nll" else ("masked_entropy", 1.0)
        loss += cfg.eta_mask * agg(per_tok(lambda b, t: sign * L[key][b][t]))
    return loss


def make_inputs(B=5, T=7, seed=0, dtype=torch.float64, hit_clamps=False, requires_grad=False) -> dict:
    """Random per-token inputs with ragged response lengths; padding holds junk (finite) values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full-length row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    lp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mlp = (lp - 1.5 * torch.rand(B, T, generator=g, dtype=torch.float64)
           + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if hit_clamps:  # official clamps: d = logp_m - logp beyond ±20, and k3 > 10 inside the ±20 range
        lp[0, 0], mlp[0, 0] = -1.0, -26.0   # d = -25 -> clamp -20 -> k3 = 19 -> clamp 10
        lp[0, 1], mlp[0, 1] = -30.0, -4.0   # d = +26 -> clamp 20 -> k3 = e^20 - 21 -> clamp 10
        lp[0, 2], mlp[0, 2] = -0.5, -13.0   # d = -12.5 -> k3 = 11.5 -> clamp 10
        lp[0, 3], mlp[0, 3] = -4.0, -1.8    # d = +2.2 -> k3 = 6.82, no clamp
        old[0, :4] = lp[0, :4] + 0.1
        ref[0, :4] = lp[0, :4] - 0.1
    inp = dict(
        logprobs=lp, old_logprobs=old, response_mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        masked_logprobs=mlp,
        entropy=3.0 * torch.rand(B, T, generator=g, dtype=torch.float64),
        masked_entropy=3.0 * torch.rand(B, T, generator=g, dtype=torch.float64),
        full_kl=torch.rand(B, T, generator=g, dtype=torch.float64),
        ref_logprobs=ref,
    )
    pad = mask == 0
    for k in ("logprobs", "old_logprobs", "masked_logprobs", "entropy", "masked_entropy", "full_kl",
              "ref_logprobs"):
        inp[k] = inp[k].masked_fill(pad, 7.0).to(dtype)  # junk at padding: must be ignored
        if requires_grad and k in ("logprobs", "masked_logprobs", "entropy", "masked_entropy", "full_kl"):
            inp[k].requires_grad_(True)
    inp["advantages"] = inp["advantages"].to(dtype)
    return inp


def cfg_of(**kw) -> AlgoConfig:
    """The algorithm settings with `kw`; the gradient through the masked branch unless `kw` says otherwise (these
    tests check that path, the default until 2026-12-07; masked_grad=false is tested where it is passed)."""
    return dataclasses.replace(AlgoConfig(), **{"masked_grad": True, **kw})


# ----------------------------------------------------------------------------------------------------------
# advantages, dynamic sampling, overlong penalty


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("norm", [True, False])
def test_group_advantages_match_reference(n, norm):
    g = torch.Generator().manual_seed(n)
    r = torch.randint(0, 3, (4 * n,), generator=g).double() * 0.5
    got = group_advantages(r, n, norm_by_std=norm, eps=1e-6)
    vals = r.tolist()
    for gi in range(4):
        grp = vals[gi * n:(gi + 1) * n]
        mean = sum(grp) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (n - 1))  # unbiased
        for k in range(n):
            want = (grp[k] - mean) / (std + 1e-6) if norm else grp[k] - mean
            assert got[gi * n + k].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_group_advantages_hand_example():
    # group 0: rewards (1, 0): mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711 -> A = ±0.70711
    # group 1: rewards (1, 1): mean 1, std 0 -> A = 0
    A = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), n=2)
    assert torch.allclose(A, torch.tensor([0.70710578, -0.70710578, 0.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), n=2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), n=1)


def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.9, 0.9, 0.1])
    keep = informative_groups(r, n=3)
    assert keep.tolist() == [False, True, False, True]
    assert keep.dtype == torch.bool
    assert informative_groups(torch.tensor([0.2, 0.2 + 1e-7]), 2).tolist() == [True]


def test_overlong_penalty():
    # max 20, buffer 8 -> expected 12: len 12 -> 0, 16 -> -0.5*f, 20 -> -f; f = 1.5
    lengths = torch.tensor([3, 12, 13, 16, 20])
    got = overlong_penalty(lengths, max_new_tokens=20, buffer=8, factor=1.5)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -1.5 / 8, -0.75, -1.5]))
    assert torch.equal(overlong_penalty(lengths, 20, 0, 1.0), torch.zeros(5))


# ----------------------------------------------------------------------------------------------------------
# KL estimators and perception KL


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("official", [False, True])
def test_kl_estimate_matches_reference(kind, official):
    inp = make_inputs(hit_clamps=True)
    a, b = inp["logprobs"], inp["masked_logprobs"]
    got = kl_estimate(a, b, kind, official=official)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            want = ref_kl(a[i, j].item(), b[i, j].item(), kind, official and kind == "k3")
            assert got[i, j].item() == pytest.approx(want, rel=1e-10, abs=1e-10), (i, j)


def test_official_k3_hits_both_clamps():
    lp = torch.tensor([-1.0, -30.0, -0.5, -4.0], dtype=torch.float64)
    mlp = torch.tensor([-26.0, -4.0, -13.0, -1.8], dtype=torch.float64)
    got = perception_kl(lp, mlp, "k1", official=True)  # official forces k3 whatever the kind
    d = 2.2
    assert torch.allclose(got, torch.tensor([10.0, 10.0, 10.0, math.exp(d) - d - 1], dtype=torch.float64))
    unclamped = perception_kl(lp, mlp, "k3")
    assert unclamped[0].item() == pytest.approx(math.exp(-25) + 25 - 1)
    assert unclamped[1].item() > 1e10


def test_perception_kl_kinds_and_clamp():
    inp = make_inputs()
    lp, mlp, fkl = inp["logprobs"], inp["masked_logprobs"], inp["full_kl"]
    assert torch.equal(perception_kl(lp, mlp, "full", full_kl=fkl), fkl)
    k1 = perception_kl(lp, mlp, "k1", clamp=0.2)
    assert torch.allclose(k1, (lp - mlp).clamp(0.0, 0.2))
    assert (k1 >= 0).all() and (k1 <= 0.2).all()
    with pytest.raises(ValueError):
        perception_kl(lp, mlp, "full")
    with pytest.raises(ValueError):
        perception_kl(lp, None, "k3")
    with pytest.raises(ValueError):
        kl_estimate(lp, mlp, "k4")


def test_k3_is_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(3)
    a = -5 * torch.rand(1000, generator=g)
    b = -5 * torch.rand(1000, generator=g)
    assert (kl_estimate(a, b, "k3") >= 0).all()
    assert torch.equal(kl_estimate(a, a, "k3"), torch.zeros(1000))


# ----------------------------------------------------------------------------------------------------------
# aggregation


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_matches_reference(mode):
    inp = make_inputs(B=6, T=9, seed=1)
    vals, mask = inp["entropy"], inp["response_mask"]
    got = aggregate(vals, mask, mode)
    assert got.item() == pytest.approx(ref_agg(vals.tolist(), mask.tolist(), mode), rel=1e-12)
    got = aggregate(vals, mask, mode, token_normalizer=37.0, seq_normalizer=11.0)
    assert got.item() == pytest.approx(ref_agg(vals.tolist(), mask.tolist(), mode, 37.0, 11.0), rel=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_microbatch_split_gives_same_loss_and_grad(mode):
    """Σ over micro-batches with the global normalizers == one batch (loss and gradient)."""
    cfg = cfg_of(loss_agg=mode, eta_orig=0.03, eta_mask=0.05, ref_kl_coef=0.01)
    full = make_inputs(B=6, T=8, seed=2, requires_grad=True)
    loss_full, _ = papo_loss(LossInputs(**full), cfg, gamma=0.02)
    g_full = torch.autograd.grad(loss_full, [full["logprobs"], full["masked_logprobs"]])

    n_tok = full["response_mask"].sum()
    parts = make_inputs(B=6, T=8, seed=2, requires_grad=True)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        mb = LossInputs(**{k: v[sl] for k, v in parts.items()})
        loss, _ = papo_loss(mb, cfg, gamma=0.02, token_normalizer=n_tok, seq_normalizer=6)
        total = total + loss
    g_parts = torch.autograd.grad(total, [parts["logprobs"], parts["masked_logprobs"]])
    assert torch.allclose(total, loss_full, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_full, g_parts):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    # and the local default normalizer would NOT give this (the test can fail)
    mb0 = LossInputs(**{k: v[0:2] for k, v in parts.items()})
    mb1 = LossInputs(**{k: v[2:6] for k, v in parts.items()})
    local = papo_loss(mb0, cfg, 0.02)[0] + papo_loss(mb1, cfg, 0.02)[0]
    assert not torch.allclose(local, loss_full)


# ----------------------------------------------------------------------------------------------------------
# policy gradient


@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_gradient_matches_reference(dual):
    inp = make_inputs(B=8, T=6, seed=4)
    lp, old, adv, mask = inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["response_mask"]
    old = old.clone()
    old[1, 0] = lp[1, 0] - math.log(5.0)  # ratio 5: clipped, and dual-clipped when A < 0
    adv = adv.clone()
    adv[1] = -abs(adv[1]) - 0.1
    loss, m = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.28, dual)
    clipped = dual_n = n_tok = 0
    for b in range(8):
        for t in range(6):
            if mask[b, t] == 0:
                continue
            want = ref_pg(lp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.28, dual)
            assert loss[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
            r = math.exp(lp[b, t].item() - old[b, t].item())
            A = adv[b].item()
            l1, l2 = -A * r, -A * min(max(r, 0.8), 1.28)
            clipped += l2 > l1
            dual_n += dual is not None and A < 0 and max(l1, l2) > -A * dual
            n_tok += 1
    assert m["pg_clipfrac"].item() == pytest.approx(clipped / n_tok)
    expected_kl = sum((old[b, t] - lp[b, t]).item() for b in range(8) for t in range(6) if mask[b, t]) / n_tok
    assert m["ppo_kl"].item() == pytest.approx(expected_kl)
    if dual is not None:
        assert dual_n >= 1
        assert m["pg_clipfrac_lower"].item() == pytest.approx(dual_n / n_tok)
    else:
        assert "pg_clipfrac_lower" not in m


def test_dual_clip_hand_example():
    # ratio 5 (logp - old = log 5), clip 0.2/0.3, c = 3:
    #   A = -1: max(5, 1.3) = 5, dual: min(5, 3) = 3          A = +1: max(-5, -1.3) = -1.3
    #   ratio 0.5, A = -1: max(0.5, 0.8) = 0.8 (below the dual bound, unchanged)
    lp = torch.tensor([[math.log(5.0)], [math.log(5.0)], [math.log(0.5)]], dtype=torch.float64)
    old = torch.zeros(3, 1, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(3, 1, dtype=torch.float64)
    loss, m = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.3, dual_clip=3.0)
    assert torch.allclose(loss.flatten(), torch.tensor([3.0, -1.3, 0.8], dtype=torch.float64))
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    loss_nodual, _ = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.3, dual_clip=None)
    assert torch.allclose(loss_nodual.flatten(), torch.tensor([5.0, -1.3, 0.8], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# the full PAPO loss


CONFIGS = {
    "default_k3": dict(eta_orig=0.03, eta_mask=0.03),
    "papo_g_3b": dict(gamma=0.02, ref_kl_coef=0.01, ref_kl_estimator="k3", clip_ratio_high=0.3, dual_clip=3.0),
    "papo_d_k1_seq_mean": dict(perception_kl="k1", loss_agg="seq-mean-token-mean", clip_ratio_high=0.28,
                               dual_clip=None, eta_orig=0.03, eta_mask=0.03),
    "k2_seq_sum_refk2": dict(perception_kl="k2", loss_agg="seq-mean-token-sum", ref_kl_coef=0.05,
                             ref_kl_estimator="k2", eta_mask=0.1),
    "full_kl_full_entropy": dict(perception_kl="full", entropy_form="full", eta_orig=0.05, eta_mask=0.05,
                                 ref_kl_coef=0.02, ref_kl_estimator="k1"),
    "k3_clamped": dict(perception_kl_clamp=0.2, eta_orig=0.02),
    "official": dict(official=True, ref_kl_coef=0.01, eta_orig=0.05, eta_mask=0.05),
    "official_overrides": dict(official=True, perception_kl="full", entropy_form="full",
                               loss_agg="seq-mean-token-sum", masked_grad=True, eta_orig=0.05, eta_mask=0.05,
                               ref_kl_coef=0.01, perception_kl_clamp=0.2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_papo_loss_matches_reference(name, dtype):
    cfg = cfg_of(**CONFIGS[name])
    official = cfg.official
    inp = make_inputs(B=6, T=9, seed=5, dtype=dtype, hit_clamps=official)
    gamma = 0.04
    loss, metrics = papo_loss(LossInputs(**inp), cfg, gamma)
    want = ref_papo(inp, cfg, gamma)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert loss.item() == pytest.approx(want, rel=tol, abs=tol)
    assert loss.dtype == dtype
    # with global normalizers too
    loss_n, _ = papo_loss(LossInputs(**inp), cfg, gamma, token_normalizer=50.0, seq_normalizer=13.0)
    assert loss_n.item() == pytest.approx(ref_papo(inp, cfg, gamma, 50.0, 13.0), rel=tol, abs=tol)

    # metrics: token-means over response tokens, perception_kl_per_seq = per-sequence mean KL_prcp
    mask = inp["response_mask"].double().tolist()
    kind = "k3" if official else cfg.perception_kl
    per_seq = []
    for b in range(6):
        ks = [(inp["full_kl"][b, t].item() if kind == "full"
               else ref_kl(inp["logprobs"][b, t].item(), inp["masked_logprobs"][b, t].item(), kind, official))
              for t in range(9) if mask[b][t]]
        if cfg.perception_kl_clamp is not None:
            ks = [min(max(k, 0.0), cfg.perception_kl_clamp) for k in ks]
        per_seq.append(sum(ks) / len(ks))
    pks = metrics["perception_kl_per_seq"]
    assert pks.shape == (6,) and not pks.requires_grad
    assert torch.allclose(pks.double(), torch.tensor(per_seq, dtype=torch.float64), rtol=tol, atol=tol)
    n_tok = sum(map(sum, mask))
    tok_kl = sum(per_seq[b] * sum(mask[b]) for b in range(6)) / n_tok
    assert metrics["perception_kl"].item() == pytest.approx(tok_kl, rel=tol, abs=tol)
    eform = "nll" if official else cfg.entropy_form
    ent = -inp["logprobs"] if eform == "nll" else inp["entropy"]
    ment = -inp["masked_logprobs"] if eform == "nll" else inp["masked_entropy"]
    m = inp["response_mask"]
    assert metrics["entropy"].item() == pytest.approx(((ent * m).sum() / m.sum()).item(), rel=tol)
    assert metrics["masked_entropy"].item() == pytest.approx(((ment * m).sum() / m.sum()).item(), rel=tol)
    assert ("ref_kl" in metrics) == (cfg.ref_kl_coef > 0)
    for k in ("pg_loss", "pg_clipfrac", "ppo_kl"):
        assert k in metrics and not metrics[k].requires_grad


def test_official_ignores_the_fields_it_forces():
    canon = cfg_of(official=True, ref_kl_coef=0.01, eta_orig=0.05, eta_mask=0.05)
    odd = cfg_of(
        official=True, perception_kl="full", entropy_form="full", loss_agg="seq-mean-token-sum",
        masked_grad=True, ref_kl_coef=0.01, eta_orig=0.05, eta_mask=0.05)
    inp = make_inputs(hit_clamps=True)
    assert torch.equal(papo_loss(LossInputs(**inp), canon, 0.02)[0], papo_loss(LossInputs(**inp), odd, 0.02)[0])
    s = loss_settings(odd)
    assert (s.perception_kl, s.entropy_form, s.loss_agg, s.masked_grad) == ("k3", "nll", "token-mean", False)
    # and official really differs from the same fields without it (clamps, NLL, token-mean)
    plain = dataclasses.replace(odd, official=False)
    assert not torch.allclose(papo_loss(LossInputs(**inp), plain, 0.02)[0],
                              papo_loss(LossInputs(**inp), odd, 0.02)[0])


@pytest.mark.parametrize("official", [False, True])
def test_masked_branch_gradient(official):
    """official: no gradient reaches the masked branch; default: it does (KL_prcp and H_mask)."""
    cfg = cfg_of(official=official, eta_orig=0.03, eta_mask=0.03, entropy_form="full", perception_kl="k3")
    inp = make_inputs(requires_grad=True, hit_clamps=official)
    loss, _ = papo_loss(LossInputs(**inp), cfg, gamma=0.02)
    g_m, g_me, g_o = torch.autograd.grad(loss, [inp["masked_logprobs"], inp["masked_entropy"], inp["logprobs"]],
                                         allow_unused=True)
    pad = inp["response_mask"] == 0
    assert g_o is not None and g_o.abs().sum() > 0
    if official:
        assert g_m is None or torch.equal(g_m, torch.zeros_like(g_m))
        assert g_me is None or torch.equal(g_me, torch.zeros_like(g_me))
    else:
        assert g_m.abs().sum() > 0 and g_me.abs().sum() > 0
        assert torch.equal(g_m[pad], torch.zeros_like(g_m[pad]))  # nothing from padding


def test_masked_grad_false_detaches_masked_inputs():
    cfg = cfg_of(masked_grad=False, eta_mask=0.1)
    inp = make_inputs(requires_grad=True)
    loss, _ = papo_loss(LossInputs(**inp), cfg, gamma=0.02)
    (g_m,) = torch.autograd.grad(loss, [inp["masked_logprobs"]], allow_unused=True)
    assert g_m is None or torch.equal(g_m, torch.zeros_like(g_m))


def test_gamma_eta_zero_is_grpo_exactly():
    cfg = cfg_of(gamma=0.0, eta_orig=0.0, eta_mask=0.0, ref_kl_coef=0.01)
    inp = make_inputs(requires_grad=True)
    papo, _ = papo_loss(LossInputs(**inp), cfg, gamma=0.0)
    # the GRPO loss composed from the primitives, and papo_loss without any masked input
    mask = inp["response_mask"]
    pg, _ = policy_gradient_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], mask,
                                 cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.dual_clip)
    kl = kl_estimate(inp["logprobs"], inp["ref_logprobs"], "k3")
    grpo = aggregate(pg, mask, "token-mean") + 0.01 * aggregate(kl, mask, "token-mean")
    bare = {k: inp[k] for k in ("logprobs", "old_logprobs", "response_mask", "advantages", "ref_logprobs")}
    grpo2, _ = papo_loss(LossInputs(**bare), cfg, gamma=0.0)
    assert torch.equal(papo, grpo) and torch.equal(papo, grpo2)
    # NaN in the masked branch cannot leak when the PAPO terms are off
    poisoned = dict(inp, masked_logprobs=torch.full_like(inp["masked_logprobs"], float("nan")))
    assert torch.equal(papo_loss(LossInputs(**poisoned), cfg, gamma=0.0)[0], papo)
    # gradient: γ > 0 changes it
    g0 = torch.autograd.grad(papo, inp["logprobs"])[0]
    papo_g, _ = papo_loss(LossInputs(**inp), cfg, gamma=0.02)
    g1 = torch.autograd.grad(papo_g, inp["logprobs"])[0]
    assert not torch.allclose(g0, g1)


def test_padding_junk_never_leaks():
    cfg = cfg_of(perception_kl="k3", eta_orig=0.05, eta_mask=0.05, ref_kl_coef=0.01)
    inp = make_inputs(requires_grad=False)
    clean_loss, _ = papo_loss(LossInputs(**inp), cfg, 0.02)
    pad = inp["response_mask"] == 0
    assert pad.any()
    junk = dict(inp)
    junk["logprobs"] = inp["logprobs"].masked_fill(pad, float("-inf")).requires_grad_(True)
    junk["masked_logprobs"] = inp["masked_logprobs"].masked_fill(pad, float("nan")).requires_grad_(True)
    junk["old_logprobs"] = inp["old_logprobs"].masked_fill(pad, float("inf"))
    loss, metrics = papo_loss(LossInputs(**junk), cfg, 0.02)
    assert torch.equal(loss, clean_loss)
    g = torch.autograd.grad(loss, [junk["logprobs"], junk["masked_logprobs"]])
    for x in g:
        assert torch.isfinite(x).all()
    for k, v in metrics.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k


def test_papo_loss_hand_example():
    """2 groups × 2 responses, rewards (1, 0 | 1, 1); logp = old_logp (ratio 1), lengths 2, 1, 3, 1.

    A = (+0.70711, −0.70711, 0, 0). Token-mean pg: Σ −A·len / 7 = (−0.70711·2 + 0.70711·1) / 7 = −0.101015.
    Perception KL k3 with logp = log 0.5, logp_m = log 0.25 on every token: d = log 0.5 = −0.693147,
    k3 = 0.5 + 0.693147 − 1 = 0.193147; token-mean 0.193147; γ = 0.1 -> −0.0193147.
    NLL entropy −log 0.5 = 0.693147, η1 = 0.01 -> +0.00693147; masked NLL −log 0.25 = 1.386294,
    η2 = 0.02 -> +0.02772589.  Total = −0.101015 − 0.0193147 + 0.0069315 + 0.0277259 = −0.0856723.
    """
    A = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), n=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    lp = torch.full((4, 3), math.log(0.5), dtype=torch.float64)
    inputs = LossInputs(logprobs=lp, old_logprobs=lp.clone(), response_mask=mask, advantages=A,
                        masked_logprobs=torch.full((4, 3), math.log(0.25), dtype=torch.float64))
    cfg = cfg_of(eta_orig=0.01, eta_mask=0.02, perception_kl="k3")
    loss, m = papo_loss(inputs, cfg, gamma=0.1)
    assert loss.item() == pytest.approx(-0.0856723, abs=2e-6)
    assert m["pg_loss"].item() == pytest.approx(-0.101015, abs=2e-6)
    assert m["perception_kl"].item() == pytest.approx(0.193147, abs=1e-6)
    assert torch.allclose(m["perception_kl_per_seq"], torch.full((4,), 0.193147, dtype=torch.float64), atol=1e-6)
    assert m["entropy"].item() == pytest.approx(0.693147, abs=1e-6)
    assert m["masked_entropy"].item() == pytest.approx(1.386294, abs=1e-6)
    assert m["pg_clipfrac"].item() == 0.0


def test_entropy_term_and_gamma_schedule():
    lp = torch.tensor([[-0.5, -2.0]])
    ent = torch.tensor([[1.0, 2.0]])
    assert torch.equal(entropy_term(lp, ent, "nll"), -lp)
    assert torch.equal(entropy_term(lp, ent, "full"), ent)
    with pytest.raises(ValueError):
        entropy_term(lp, None, "full")
    const = cfg_of(gamma=0.02)
    assert gamma_at(0, 10, const) == gamma_at(9, 10, const) == 0.02
    lin = cfg_of(gamma=0.04, gamma_schedule="linear", gamma_final=0.01)
    assert gamma_at(0, 11, lin) == pytest.approx(0.04)
    assert gamma_at(5, 11, lin) == pytest.approx(0.025)
    assert gamma_at(10, 11, lin) == pytest.approx(0.01)
    assert gamma_at(50, 11, lin) == pytest.approx(0.01)


def test_missing_inputs_raise():
    inp = make_inputs()
    bare = LossInputs(inp["logprobs"], inp["old_logprobs"], inp["response_mask"], inp["advantages"])
    with pytest.raises(ValueError):
        papo_loss(bare, cfg_of(), gamma=0.02)  # needs masked_logprobs
    with pytest.raises(ValueError):
        papo_loss(bare, cfg_of(ref_kl_coef=0.1), gamma=0.0)  # needs ref_logprobs
    with pytest.raises(ValueError):
        papo_loss(bare, cfg_of(eta_mask=0.1), gamma=0.0)  # needs masked branch


# ----------------------------------------------------------------------------------------------------------
# gradchecks (float64)


@pytest.mark.parametrize("name", ["default_k3", "papo_g_3b", "full_kl_full_entropy", "k2_seq_sum_refk2",
                                  "official"])
def test_gradcheck_papo_loss_per_token_inputs(name):
    cfg = cfg_of(**CONFIGS[name])
    inp = make_inputs(B=3, T=4, seed=6, requires_grad=True)
    keys = ["logprobs", "masked_logprobs", "entropy", "masked_entropy", "full_kl"]
    if cfg.official:  # stop-gradient on the masked branch by design: check the original branch only
        keys = ["logprobs", "entropy", "full_kl"]

    def fn(*xs):
        d = dict(inp, **dict(zip(keys, xs)))
        return papo_loss(LossInputs(**d), cfg, gamma=0.05)[0]

    assert torch.autograd.gradcheck(fn, tuple(inp[k] for k in keys), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,form", [("full", "full"), ("k3", "nll"), ("k1", "full")])
def test_gradcheck_papo_loss_wrt_both_branch_logits(kind, form):
    """Log-probs, entropies and the full KL built from logits of both branches; gradcheck w.r.t. both."""
    B, T, V = 2, 3, 5
    g = torch.Generator().manual_seed(7)
    logits_o = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    logits_m = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T, 1), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    old = torch.log_softmax(logits_o.detach() + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64),
                            -1).gather(-1, y).squeeze(-1)
    adv = torch.tensor([0.8, -1.1], dtype=torch.float64)
    cfg = cfg_of(perception_kl=kind, entropy_form=form, eta_orig=0.05, eta_mask=0.03)

    def fn(lo, lm):
        lpo, lpm = torch.log_softmax(lo, -1), torch.log_softmax(lm, -1)
        po, pm = lpo.exp(), lpm.exp()
        inputs = LossInputs(logprobs=lpo.gather(-1, y).squeeze(-1), old_logprobs=old, response_mask=mask,
                            advantages=adv, masked_logprobs=lpm.gather(-1, y).squeeze(-1),
                            entropy=-(po * lpo).sum(-1), masked_entropy=-(pm * lpm).sum(-1),
                            full_kl=(po * (lpo - lpm)).sum(-1))
        return papo_loss(inputs, cfg, gamma=0.1)[0]

    assert torch.autograd.gradcheck(fn, (logits_o, logits_m), eps=1e-6, atol=1e-7)
    g_o, g_m = torch.autograd.grad(fn(logits_o, logits_m), (logits_o, logits_m))
    assert g_o.abs().sum() > 0 and g_m.abs().sum() > 0
