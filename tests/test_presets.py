"""Paper presets load, PAPO-G / PAPO-D run 2 steps on the tiny model, and DAPO dynamic sampling refills groups."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo_engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
LOCAL = ["model.path=null", "data.train_files=[]"]  # the checkpoints and ViRL39K are not on this machine
TINY = [*LOCAL, "model.dtype=float32", "model.gradient_checkpointing=false", "data.min_pixels=3136",
        "data.max_pixels=3136", "rollout.max_new_tokens=8", "rollout.batch_size=64", "deepspeed.zero_stage=0",
        "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2", "trainer.micro_batch_size=8", "trainer.steps=2",
        "warmup.steps=2", "trainer.eval_samples=4", "optim.lr=1e-3"]


def test_all_presets_present_and_load():
    names = {p.stem for p in PRESETS}
    assert {"tiny_cpu", "papo_g_3b", "papo_g_7b", "papo_d_3b", "papo_d_7b", "grpo_3b", "dapo_3b",
            "papo_g_3b_official"} <= names
    for preset in PRESETS:
        cfg = load_config(preset, LOCAL)
        assert cfg.trainer.steps >= 1


def test_published_hyperparameters():
    g3 = load_config(ROOT / "configs" / "papo_g_3b.yaml", LOCAL).algo
    g7 = load_config(ROOT / "configs" / "papo_g_7b.yaml", LOCAL).algo
    d3 = load_config(ROOT / "configs" / "papo_d_3b.yaml", LOCAL).algo
    grpo = load_config(ROOT / "configs" / "grpo_3b.yaml", LOCAL).algo
    official = load_config(ROOT / "configs" / "papo_g_3b_official.yaml", LOCAL).algo
    assert (g3.gamma, g3.eta_orig, g3.ref_kl_coef, g3.clip_ratio_high, g3.dual_clip) == (0.02, 0.0, 0.01, 0.3, 3.0)
    assert (g7.gamma, g7.eta_orig, g7.eta_mask) == (0.02, 0.05, 0.05)
    assert (d3.gamma, d3.eta_orig, d3.eta_mask, d3.ref_kl_coef, d3.clip_ratio_high, d3.dynamic_sampling) == \
        (0.01, 0.03, 0.03, 0.0, 0.28, True)
    assert (grpo.gamma, grpo.eta_orig, grpo.eta_mask) == (0.0, 0.0, 0.0)  # the baseline really is GRPO
    assert official.official is True


@pytest.mark.parametrize("preset", ["papo_g_3b", "papo_d_3b", "grpo_3b"])
def test_preset_two_steps_on_tiny_model(preset, tmp_path):
    cmd = [sys.executable, "-m", "papo_engine.cli", "train", "--config", str(ROOT / "configs" / f"{preset}.yaml"),
           *TINY, f"trainer.output_dir={tmp_path}", "logging.wandb=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    if preset == "papo_g_3b":
        assert all("update/ref_kl" in r for r in rows)  # β = 0.01: the reference model is used
    elif preset == "papo_d_3b":
        assert all("dynamic_sampling/rounds" in r for r in rows)
    else:  # the GRPO baseline runs no masked branch at all
        assert not any("perception_kl" in r or "masked_entropy" in r for r in rows)
    if preset != "grpo_3b":
        assert all(r["perception_kl"] >= 0 and "masked_entropy" in r for r in rows)


# ---------------------------------------------------------------------------------------------------------
# DAPO dynamic sampling, with scripted rewards


def _scripted_trainer(tiny, rewards_per_round, max_rounds=20):
    from papo_engine.actor import SequenceBatch
    from papo_engine.batching import repeat_prompts
    from papo_engine.data import GeneratedDataset
    from papo_engine.models import encode_prompts
    from papo_engine.rollout.base import SamplingParams
    from papo_engine.trainer import PAPOTrainer, Rollouts, Timer

    cfg, tokenizer, processor, _ = tiny
    cfg = load_config(None, ["algo.dynamic_sampling=true", f"algo.dynamic_sampling_max_rounds={max_rounds}",
                             "trainer.prompts_per_step=4", "rollout.n=2"])
    trainer = PAPOTrainer.__new__(PAPOTrainer)
    trainer.cfg, trainer.world, trainer.rank, trainer.tokenizer = cfg, 1, 0, tokenizer
    trainer.sampling = SamplingParams(2, 1.0, 1.0, 4)
    ds = GeneratedDataset("shape_color", "train", 100, 0, 56)
    calls = iter(rewards_per_round)
    round_no = [0]

    def generate(samples, keys, timer=None):
        rewards = torch.tensor(next(calls), dtype=torch.float32)
        prompts = encode_prompts([s.question for s in samples], [[s.image] for s in samples], tokenizer, processor)
        tag = round_no[0]
        round_no[0] += 1
        ids = torch.full((len(samples) * 2, 3), 100 + tag)  # the round is readable from the response ids
        seqs = SequenceBatch(repeat_prompts(prompts, 2), ids, torch.ones(len(samples) * 2, 3))
        return Rollouts(prompts, keys, [s.answer for s in samples], seqs, {"reward": rewards},
                        [f"r{tag}"] * (len(samples) * 2))

    trainer.generate = generate
    trainer.next_prompts = lambda count: ([ds[i] for i in range(count)], list(range(count)))
    return trainer, Timer


def test_dynamic_sampling_drops_equal_groups_and_refills(tiny):
    # round 0: groups 1 and 3 informative; round 1: groups 0, 2, 3 informative -> 2 + 2 kept
    trainer, Timer = _scripted_trainer(tiny, [[0, 0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1, 1, 0]])
    batch, info = trainer.collect(Timer())
    assert info == {"dynamic_sampling/dropped_groups": 3, "dynamic_sampling/rounds": 2,
                    "dynamic_sampling/kept_groups": 4, "dynamic_sampling/padding_groups": 0}
    assert batch.scores["reward"].tolist() == [1, 0, 0, 1, 1, 0, 0, 1]
    assert batch.sequences.response_ids[:, 0].tolist() == [100, 100, 100, 100, 101, 101, 101, 101]
    assert len(batch.prompts.images_per_prompt) == 4 and len(batch.sequences) == 8


def test_dynamic_sampling_is_bounded(tiny):
    trainer, Timer = _scripted_trainer(tiny, [[1] * 8] * 3, max_rounds=3)
    batch, info = trainer.collect(Timer())
    assert info["dynamic_sampling/rounds"] == 3 and info["dynamic_sampling/dropped_groups"] == 12
    assert info["dynamic_sampling/kept_groups"] == 0


def test_dynamic_sampling_pads_a_short_batch_with_masked_copies(tiny):
    """After the last round only 2 of 4 groups are informative (one per round): the batch still has 4 groups
    (equal micro-batch counts on every rank), the 2 copies with no response tokens, so they add nothing."""
    trainer, Timer = _scripted_trainer(tiny, [[1, 1, 0, 1, 1, 1, 1, 1]] * 2, max_rounds=2)
    batch, info = trainer.collect(Timer())
    assert info["dynamic_sampling/kept_groups"] == 2 and info["dynamic_sampling/padding_groups"] == 2
    assert len(batch.sequences) == 8
    assert (batch.sequences.response_mask[:4].sum(1) > 0).all() and batch.sequences.response_mask[4:].sum() == 0
