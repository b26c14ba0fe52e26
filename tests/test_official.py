"""`algo.official`: what it refuses, and the official preset's loss and gradient against the authors' computation.

`authors_micro_batch_loss` below is written from MikeWangWZHL/PAPO @ fb63bf4 (verl/workers/actor/dp_actor.py
`update_policy`, verl/trainer/core_algos.py `compute_policy_loss` / `compute_kl`, verl/utils/torch_functional.py
`masked_mean`), in float64, sharing no code with papo_engine.
"""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from papo_engine.algorithms import LossInputs, papo_loss
from papo_engine.config import OFFICIAL_SETTINGS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "configs" / "papo_g_3b_official.yaml"
LOCAL = ["model.path=null", "data.train_files=[]"]


# ----------------------------------------------------------------------------------------------------------
# the authors' computation, one micro-batch


def _masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def _low_var_kl(log_probs, ref_log_probs):
    kl = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return (kl.exp() - kl - 1).clamp(min=-10.0, max=10.0)


def authors_micro_batch_loss(log_probs, old_log_probs, advantages, response_mask, ref_log_probs, aug_log_probs, *,
                             clip_ratio_low, clip_ratio_high, kl_coef, kl_prcp_coef, ori_entropy_coef,
                             aug_entropy_coef, gradient_accumulation, clip_ratio_dual=3.0):
    """`loss` of one micro-batch as dp_actor.update_policy backpropagates it (kl_prcp_apply_mode=all, fixed
    schedule, no kl_prcp clipping, no token-level mask, no SFT loss); coefficient 0 = the term is off."""
    adv = advantages[:, None] * response_mask  # compute_grpo_outcome_advantage: scores.unsqueeze(-1) * mask
    negative_approx_kl = (log_probs - old_log_probs).clamp(-20.0, 20.0)
    ratio = negative_approx_kl.exp()
    clipped_ratio = negative_approx_kl.clamp(math.log(1 - clip_ratio_low), math.log(1 + clip_ratio_high)).exp()
    pg_loss1, pg_loss2, pg_loss3 = -adv * ratio, -adv * clipped_ratio, -adv * clip_ratio_dual
    higher = torch.max(pg_loss1, pg_loss2)
    lower = torch.min(higher, pg_loss3)
    loss = _masked_mean(torch.where(adv < 0, lower, higher), response_mask)
    entropy_loss = -_masked_mean(log_probs, response_mask)
    if kl_coef:
        loss = loss + _masked_mean(_low_var_kl(log_probs, ref_log_probs), response_mask) * kl_coef
    aug_entropy_loss = -_masked_mean(aug_log_probs, response_mask)
    kl_prcp_loss = _masked_mean(_low_var_kl(log_probs, aug_log_probs) * 1.0, response_mask)
    loss = loss - kl_prcp_loss * kl_prcp_coef
    if aug_entropy_coef:
        loss = loss + aug_entropy_coef * 1.0 * aug_entropy_loss
    if ori_entropy_coef:
        loss = loss + ori_entropy_coef * 1.0 * entropy_loss
    return loss / gradient_accumulation


def _authors_kwargs(algo, gradient_accumulation):
    return dict(clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high, kl_coef=algo.ref_kl_coef,
                kl_prcp_coef=algo.gamma, ori_entropy_coef=algo.eta_orig, aug_entropy_coef=algo.eta_mask,
                gradient_accumulation=gradient_accumulation)


def _inputs(B=8, T=12, seed=0):
    """Log-probs that reach every branch: clipped ratios both ways, dual clip (A < 0, ratio ≫ 1), |d| > 20 and
    k3 > 10 in both KLs, and padding of varying length holding garbage."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    old[0, :4] = logp[0, :4] - 3.0       # ratio e^3 ≫ 1 + 3.0
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    ref[1, 0], ref[1, 1] = logp[1, 1] + 25.0, logp[1, 1] + 3.5   # beyond ±20; k3 > 10
    aug = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 1.5
    aug[2, 0], aug[2, 1], aug[3, 2] = logp[2, 0] + 30.0, logp[2, 1] - 30.0, logp[3, 2] + 4.0
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = -1.5
    for t in (old, ref, aug):
        t.masked_fill_(mask == 0, float("nan"))  # garbage at padding must not leak
    return logp, old, ref, aug, mask, adv


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------------------
# refusal


def test_official_refuses_each_conflicting_setting_by_name():
    conflicting = {"algo.norm_adv_by_std": ["false"], "algo.perception_kl": ["k2"], "algo.perception_kl_clamp": ["0.2"],
                   "algo.entropy_form": ["full"], "algo.loss_agg": ["seq-mean-token-sum"], "algo.masked_grad": ["true"],
                   "algo.dual_clip": ["null", "2.0"], "algo.ref_kl_estimator": ["k1"],
                   "algo.dynamic_sampling_metric": ["reward"], "algo.overlong_buffer": ["16"],
                   "mask.space": ["grid"], "optim.lr_schedule": ["cosine"], "optim.warmup_steps": ["10"],
                   "optim.betas": ["[0.9,0.99]"]}
    # algo.advantage has no other choice yet; mask.fill != black is refused for the raw space in general
    assert set(conflicting) | {"algo.advantage", "mask.fill"} == {key for key, *_ in OFFICIAL_SETTINGS}
    for key, values in conflicting.items():
        extra = ["algo.dynamic_sampling=true"] if key == "algo.dynamic_sampling_metric" else []
        for value in values:
            with pytest.raises(ConfigError) as err:
                load_config(OFFICIAL, [*LOCAL, *extra, f"{key}={value}"])
            message = str(err.value)
            assert "\n" not in message and message.startswith(f"algo.official=true conflicts with {key}="), message
            assert message.count("(authors: ") == 1, message
    with pytest.raises(ConfigError, match="mask.fill='mean': the raw-image space blacks out pixels"):
        load_config(OFFICIAL, [*LOCAL, "mask.fill=mean"])
    with pytest.raises(ConfigError, match=r"conflicts with mask.space=grid \(authors: raw\), mask.fill=mean"):
        load_config(OFFICIAL, [*LOCAL, "mask.space=grid", "mask.fill=mean"])


def test_official_refusal_names_every_conflict_on_the_defaults():
    with pytest.raises(ConfigError) as err:  # the default's masked_grad=false is already the authors'
        load_config(None, ["algo.official=true"])
    assert str(err.value) == (
        "algo.official=true conflicts with algo.perception_kl_clamp=0.2 (authors: null), "
        "mask.space=grid (authors: raw), optim.lr_schedule=cosine (authors: constant), "
        "optim.betas=[0.9, 0.99] (authors: [0.9, 0.999]) (the authors' computation); set those values or "
        "algo.official=false")


def test_official_leaves_the_authors_hyperparameters_free():
    """γ, η, β, clip ratios, lr, mask ratio and square size vary between the authors' scripts: not refused."""
    cfg = load_config(OFFICIAL, [*LOCAL, "algo.gamma=0.01", "algo.eta_orig=0.03", "algo.eta_mask=0.03",
                                 "algo.ref_kl_coef=0", "algo.clip_ratio_high=0.28", "optim.lr=2e-6", "mask.ratio=0.8",
                                 "mask.square_px=28", "algo.ref_kl_estimator=k1"])  # no reference KL: estimator unused
    assert cfg.algo.official and cfg.algo.gamma == 0.01
    with pytest.raises(ConfigError, match="algo.ref_kl_estimator=k1"):
        load_config(OFFICIAL, [*LOCAL, "algo.ref_kl_estimator=k1"])


# ----------------------------------------------------------------------------------------------------------
# the loss: our papo_loss on identical inputs, per micro-batch as the trainer calls it


VARIANTS = {
    "papo_g_3b_official": [],
    "official_with_double_entropy_no_ref": ["algo.gamma=0.01", "algo.eta_orig=0.03", "algo.eta_mask=0.03",
                                            "algo.ref_kl_coef=0", "algo.clip_ratio_high=0.28"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_loss_and_gradient_equal_the_authors(variant):
    algo = load_config(OFFICIAL, [*LOCAL, *VARIANTS[variant]]).algo
    logp, old, ref, aug, mask, adv = _inputs()
    chunks = [(0, 3), (3, 6), (6, 8)]  # uneven micro-batches: each normalized by ITS tokens, / accumulation count
    ours_lp = logp.clone().requires_grad_(True)
    theirs_lp = logp.clone().requires_grad_(True)
    ours_total, theirs_total = 0.0, 0.0
    for a, b in chunks:
        m = mask[a:b]
        inputs = LossInputs(logprobs=ours_lp[a:b], old_logprobs=old[a:b], response_mask=m, advantages=adv[a:b],
                            masked_logprobs=aug[a:b], ref_logprobs=ref[a:b])
        ours, _ = papo_loss(inputs, algo, algo.gamma, token_normalizer=m.sum().clamp(min=1) * len(chunks))
        clean = [x[a:b].nan_to_num(0.0) for x in (old, ref, aug)]  # the authors' tensors hold no NaN padding
        theirs = authors_micro_batch_loss(theirs_lp[a:b], clean[0], adv[a:b], m, clean[1], clean[2],
                                          **_authors_kwargs(algo, len(chunks)))
        assert _rel(ours.detach(), theirs.detach()) <= 1e-6, (a, b, float(ours), float(theirs))
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
    ours_total.backward()
    theirs_total.backward()
    assert _rel(ours_total.detach(), theirs_total.detach()) <= 1e-6
    assert _rel(ours_lp.grad, theirs_lp.grad) <= 1e-6
    assert ours_lp.grad[mask == 0].abs().max() == 0

    # the check has teeth: the clamp the official preset used to inherit changes the loss
    clamped = dataclasses.replace(algo, perception_kl_clamp=0.2)
    m = mask[0:3]
    inputs = LossInputs(logprobs=logp[0:3], old_logprobs=old[0:3], response_mask=m, advantages=adv[0:3],
                        masked_logprobs=aug[0:3], ref_logprobs=ref[0:3])
    with_clamp, _ = papo_loss(inputs, clamped, algo.gamma, token_normalizer=m.sum() * len(chunks))
    without, _ = papo_loss(inputs, algo, algo.gamma, token_normalizer=m.sum() * len(chunks))
    assert _rel(with_clamp, without) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# the trainer's micro-batch path, one step of the official preset on the tiny model


@pytest.mark.slow
def test_official_trainer_step_equals_the_authors_on_the_tiny_model(tmp_path):
    """One real step (rollout, rewards, raw-image masks, rollout-time log-probs of both branches and the reference,
    5 micro-batches of 4): the gradient the trainer accumulates equals the authors' per-micro-batch loss
    backpropagated through the same model from the same inputs."""
    from papo_engine.actor import response_token_stats
    from papo_engine.masking import mask_prompts
    from papo_engine.trainer import PAPOTrainer

    cfg = load_config(OFFICIAL, [*LOCAL, "model.dtype=float32", "model.gradient_checkpointing=false",
                                 "data.min_pixels=3136", "data.max_pixels=3136", "rollout.max_new_tokens=8",
                                 "rollout.batch_size=64", "deepspeed.zero_stage=0", "trainer.prompts_per_step=4",
                                 "trainer.mini_batch_prompts=4", "trainer.micro_batch_size=4", "trainer.steps=1",
                                 "warmup.steps=10", "trainer.eval_samples=1", "trainer.save_every=0",
                                 "trainer.save_final=false", "logging.wandb=false", "logging.plot=false",
                                 "algo.gamma=0.5", f"trainer.output_dir={tmp_path}"])  # γ large: the KL term shows
    trainer = PAPOTrainer(cfg)
    module = trainer.engine.module
    seen = {}
    update = trainer.update

    def spy_update(seqs, advantages, old, gamma):
        seen.update(seqs=seqs, advantages=advantages, old=old, gamma=gamma)
        return update(seqs, advantages, old, gamma)

    def capture_step():  # keep the accumulated gradient, take no optimizer step
        seen["grads"] = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return 0.0, True

    attach_masks = trainer.attach_masks

    def spy_attach_masks(batch):
        seen["batch"] = batch
        return attach_masks(batch)

    trainer.update, trainer.engine.step, trainer.attach_masks = spy_update, capture_step, spy_attach_masks
    metrics = trainer.train_step(0)
    seqs, old, batch = seen["seqs"], seen["old"], seen["batch"]
    assert len(seqs) == 20 and "ref_logprobs" in old
    # the masked branch saw the authors' raw-image masks (keyed per prompt), not the patch-grid ones
    raw, _ = mask_prompts(cfg.mask, batch.prompts, batch.prompt_keys, 5, cfg.trainer.seed, trainer.image_processor)
    grid, _ = mask_prompts(dataclasses.replace(cfg.mask, space="grid"), batch.prompts, batch.prompt_keys, 5,
                           cfg.trainer.seed, trainer.image_processor)
    assert torch.equal(seqs.masked_pixel_values, raw) and not torch.equal(raw, grid)
    chunks = trainer.micro_batches(seqs, 0, len(seqs))
    assert chunks == [list(range(a, a + 4)) for a in range(0, 20, 4)]  # fixed micro-batches: the authors' loss
    total = 0.0
    for a, b in ((c[0], c[-1] + 1) for c in chunks):
        mb = seqs.slice(a, b)
        stats = response_token_stats(module, mb, both_branches=False, temperature=cfg.rollout.temperature)
        loss = authors_micro_batch_loss(
            stats["logprobs"].double(), old["logprobs"][a:b].double(), seen["advantages"][a:b].double(),
            mb.response_mask.double(), old["ref_logprobs"][a:b].double(), old["masked_logprobs"][a:b].double(),
            **_authors_kwargs(dataclasses.replace(cfg.algo, gamma=seen["gamma"]), len(chunks)))
        loss.backward()
        total += float(loss)
    ours = torch.cat([seen["grads"][n].flatten() for n in sorted(seen["grads"])])
    theirs = torch.cat([p.grad.flatten() for n, p in sorted(module.named_parameters()) if n in seen["grads"]])
    assert ours.abs().max() > 0
    assert float((ours - theirs).norm() / theirs.norm()) <= 1e-6  # measured 2e-7: float32 model and loss
    assert abs(metrics["update/loss"] - total) <= 1e-5 * max(abs(total), 1e-2)
    trainer.tracker.close()
