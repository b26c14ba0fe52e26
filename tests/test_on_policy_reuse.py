"""On-policy reuse (`trainer.on_policy_reuse`, papo_engine/old_policy.py): when the update is exactly on-policy
(one epoch, one optimizer step per rollout) the update forward, detached, stands in for the separate no-grad
old-log-prob pass. With gradient through the masked branch (and for GRPO) the result must be the SAME run —
parameters, losses and every metric bit-identical over several steps — because the no-grad pass and the update
forward compute the same values from the same weights over the same micro-batches. Without it (official /
masked_grad=false) only a no-grad forward of the masked half runs, inside the update, and the update's head call
takes both branches: the same run within fp32 rounding (B instead of 2B sequences per forward: a GEMM may block
differently — identical on an AVX-512 CPU, a few fp32 ulps apart on an AVX2 one). Where on-policy does not hold
(ppo_epochs > 1, several optimizer steps per rollout) the separate pass still runs."""
from __future__ import annotations

import pytest
import torch

from fp32_bounds import assert_within_bounds, run_differences
from papo_engine import old_policy
from papo_engine.config import load_config, official_overrides



def parity_reward(response: str, answer: str) -> dict[str, float]:
    """Varies within a group after a few tokens, unlike the task's reward (8 tokens never reach the answer
    format): non-zero advantages, so real policy-gradient updates, not zero-advantage no-ops."""
    return {"reward": float(len(response) % 2)}


# 4 prompts x 4 responses = 16 sequences in 2 micro-batches of 8; a 2-step warm-start (parity_reward gives the
# advantages, so a longer one adds nothing here: it was half of each run's time)
SMALL = ["trainer.steps=3", "warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=4",
         "trainer.micro_batch_size=8", "rollout.max_new_tokens=8", "trainer.eval_samples=1", "trainer.save_every=0",
         "trainer.save_final=false", "logging.wandb=false", "logging.plot=false",
         f"reward.function={__name__}.parity_reward"]
MODES = {"grpo": ["algo.gamma=0"], "papo": ["algo.masked_grad=true"], "official": official_overrides()}  # papo: both branches
# no gradient through the masked branch, outside `official`: full entropies of both branches in the loss
MASKED_NO_GRAD = {"official": official_overrides(),
                  "masked_grad_false": ["algo.masked_grad=false", "algo.entropy_form=full", "algo.eta_orig=0.05",
                                        "algo.eta_mask=0.05"]}


def _run(tmp_path, monkeypatch, reuse: bool, *overrides, steps: int = 3, setup=None):
    """`steps` training steps in this process. Returns (metrics per step without timings, final parameters,
    number of separate no-grad forwards of the policy, the trainer, the sequence count of each no-grad forward of
    the masked half in the update)."""
    from papo_engine import update as trainer_module  # the update role: its masked-half pass
    from papo_engine.trainer import PAPOTrainer

    out = tmp_path / f"reuse-{reuse}"
    cfg = load_config(None, [*SMALL, f"trainer.output_dir={out}", f"trainer.on_policy_reuse={str(reuse).lower()}",
                             *overrides])
    trainer = PAPOTrainer(cfg)
    if setup is not None:
        setup(trainer)
    models, masked_half_sizes = [], []
    real, real_masked = old_policy.response_token_stats, trainer_module.masked_branch_hidden

    def counting(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    def counting_masked(model, batch):
        masked_half_sizes.append(len(batch))
        return real_masked(model, batch)

    monkeypatch.setattr(old_policy, "response_token_stats", counting)
    monkeypatch.setattr(trainer_module, "masked_branch_hidden", counting_masked)
    rows = [{k: v for k, v in trainer.train_step(step).items() if not k.startswith("time/")} for step in range(steps)]
    monkeypatch.setattr(old_policy, "response_token_stats", real)
    monkeypatch.setattr(trainer_module, "masked_branch_hidden", real_masked)
    trainer.tracker.close()
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    return rows, params, sum(m is trainer.engine.module for m in models), trainer, masked_half_sizes


def _assert_same_run(a, b):
    rows_a, params_a = a[:2]
    rows_b, params_b = b[:2]
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        differ = {k: (ra[k], rb[k]) for k in ra if ra[k] != rb[k]}
        assert not differ, differ  # bit-identical metrics, loss included
    differ = [n for n in params_a if not torch.equal(params_a[n], params_b[n])]
    assert not differ, differ  # bit-identical parameters


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grpo", "papo"])
def test_reuse_gives_the_same_run_bit_for_bit(tmp_path, monkeypatch, mode):
    """GRPO and PAPO default, 3 steps, with and without the lever."""
    with_reuse = _run(tmp_path, monkeypatch, True, *MODES[mode])
    without = _run(tmp_path, monkeypatch, False, *MODES[mode])
    _assert_same_run(with_reuse, without)
    rows = with_reuse[0]
    assert all(r["grad_norm"] > 0 for r in rows)  # real updates, not zero-advantage no-ops
    assert all(r["nonfinite/skipped_step"] == 0 for r in rows)
    if mode != "grpo":
        assert all(r["perception_kl"] > 0 and r["masked_entropy"] > 0 for r in rows)  # diagnostics from π_old
    # the separate pass: 2 micro-batches per step without the lever; skipped with it
    assert without[2] == 2 * len(rows)
    assert with_reuse[2] == 0 and with_reuse[4] == without[4] == []
    assert with_reuse[3].reuse_update_forward


@pytest.mark.slow
@pytest.mark.parametrize("mode, overrides, passes", [
    ("official", [], [16]),  # default: two micro-batches of 8 per pass -> one pass over the step's 16
    # whole micro-batches of 4 per pass: 12 -> 3 of them, then the remaining one
    ("official", ["trainer.micro_batch_size=4", "trainer.no_grad_micro_batch_size=12"], [12, 4]),
    ("masked_grad_false", ["trainer.no_grad_micro_batch_size=8"], [8, 8]),  # one per micro-batch
])
def test_reuse_without_masked_gradient_matches_the_separate_pass(tmp_path, monkeypatch, mode, overrides, passes):
    """official and masked_grad=false, 3 steps: with the lever the separate 2B-sequence pass is gone and no-grad
    forwards of the masked half (trainer.no_grad_micro_batch_size sequences each, in whole micro-batches) run in
    the update as its micro-batches reach them; the update's head calls over both branches give π_old (masked
    constants and the full-vocabulary perception KL). Not bit for bit by construction (other batch shapes: a GEMM
    may block differently), so parameters and every logged metric must agree within the fp32 bounds
    (tests/fp32_bounds.py)."""
    with_reuse = _run(tmp_path, monkeypatch, True, *MASKED_NO_GRAD[mode], *overrides)
    without = _run(tmp_path, monkeypatch, False, *MASKED_NO_GRAD[mode], *overrides)
    rows = with_reuse[0]
    micro_batches = 16 // with_reuse[3].cfg.trainer.micro_batch_size
    assert all(r["grad_norm"] > 0 and r["nonfinite/skipped_step"] == 0 for r in rows)
    assert all(r["perception_kl"] > 0 and r["masked_entropy"] > 0 for r in rows)  # diagnostics from π_old
    assert with_reuse[2] == 0 and without[2] == micro_batches * len(rows)   # the separate 2B pass: gone
    assert with_reuse[4] == passes * len(rows) and without[4] == []  # the masked half, in passes of that size
    assert with_reuse[3].masked_forward_without_grad and not without[3].masked_forward_without_grad
    _assert_close_run(with_reuse, without, mode)


def _assert_close_run(with_reuse, without, label: str) -> None:
    """The masked-half pass against the separate pass: every metric and parameter within the fp32 bounds, except
    the policy ratio's log (exactly 0 with the lever, where π_old is the update forward; rounding noise at most
    without it)."""
    assert all(r["update/ppo_kl"] == 0 for r in with_reuse[0])
    assert all(abs(r["update/ppo_kl"]) < 1e-7 for r in without[0])
    assert_within_bounds(run_differences(*with_reuse[:2], *without[:2], with_reuse[3].cfg.optim.lr), label)


@pytest.mark.slow
@pytest.mark.parametrize("override", ["trainer.ppo_epochs=2", "trainer.mini_batch_prompts=2"])
def test_separate_pass_runs_when_not_on_policy(tmp_path, monkeypatch, override):
    """Two epochs, or two optimizer steps per rollout: from the second optimizer step on the current policy is not
    the one that sampled, so π_old must come from the separate pass — also with the lever switched on."""
    rows, _, separate, trainer, _ = _run(tmp_path, monkeypatch, True, override, steps=1)
    assert not trainer.reuse_update_forward
    assert separate == 2  # one no-grad forward per micro-batch
    # the later optimizer step(s) see a moved policy: the ratio differs from 1 (reuse would force it to 1)
    assert rows[0]["update/ppo_kl"] != 0


@pytest.mark.slow
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["papo", "official"])
def test_rollout_is_weights_and_mismatch_from_the_update_forward(tmp_path, monkeypatch, level, mode):
    """With a rollout backend that reports log-probs, the IS weights of each micro-batch are formed from the update
    forward before its loss, and the mismatch metrics from the complete π_old: the same numbers as the separate
    pass (official: within the fp32 bounds). (HF rollout reports none, so the rollout's log-probs are made up
    here: the trainer's own, shifted.)"""
    def setup(trainer):
        trainer.cfg.algo.rollout_is, trainer.cfg.algo.rollout_is_level = "truncate", level
        trainer.cfg.algo.rollout_is_threshold = 1.5
        collect = trainer.collect

        def with_rollout_logprobs(timer):
            batch, info = collect(timer)
            ids = batch.sequences.response_ids
            batch.rollout_logprobs = -3.0 + 0.5 * torch.sin(ids.float()) * batch.sequences.response_mask
            return batch, info
        trainer.collect = with_rollout_logprobs

    with_reuse = _run(tmp_path, monkeypatch, True, *MODES[mode], setup=setup)
    without = _run(tmp_path, monkeypatch, False, *MODES[mode], setup=setup)
    if mode == "official":
        _assert_close_run(with_reuse, without, f"official, rollout IS per {level}")
    else:
        _assert_same_run(with_reuse, without)
    assert with_reuse[2] == 0
    rows = with_reuse[0]
    assert all(0 < r["rollout/is_weight_mean"] < 1.5 and r["rollout/kl"] > 0 for r in rows)


def test_switch_and_rule():
    def reuse(*overrides):
        cfg = load_config(None, list(overrides))
        per_step = cfg.trainer.prompts_per_step // (cfg.trainer.mini_batch_prompts or cfg.trainer.prompts_per_step)
        return old_policy.on_policy_reuse(cfg, per_step)

    assert reuse()  # the default run
    assert reuse("algo.gamma=0")  # GRPO: no masked branch
    assert reuse("trainer.mini_batch_prompts=16")  # one mini-batch = the whole step
    assert not reuse("trainer.on_policy_reuse=false")
    assert not reuse("trainer.ppo_epochs=2")
    assert not reuse("trainer.mini_batch_prompts=8")
    assert reuse("algo.masked_grad=false")  # a no-grad forward of the masked half stays
    assert reuse(*official_overrides())
