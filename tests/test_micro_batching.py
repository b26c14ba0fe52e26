"""Length-aware micro-batches (papo_engine/micro_batching.py): the plan on hand-made lengths, the buckets against
an exhaustive search, the padding count on a hand-made batch, and a real run whose responses have long-tailed
lengths: the same loss, gradient and metrics as fixed micro-batches, within the fp32 bounds."""
import itertools

import pytest
import torch

from fp32_bounds import assert_within_bounds, run_differences
from papo_engine.actor import SequenceBatch
from papo_engine.config import load_config, official_overrides
from papo_engine.micro_batching import (BUCKET_OVERHEAD_TOKENS, forward_slots, plan_micro_batches,
                                        response_buckets, split_to_count)
from papo_engine.models import PromptBatch
from papo_engine.rollout.lengths import LengthProfile


def test_plan_keeps_groups_whole_within_the_budget_longest_prompts_first():
    # three prompt groups of 2 (prompts 10, 30, 20 tokens); responses as listed
    prompts = [10, 10, 30, 30, 20, 20]
    responses = [5, 40, 7, 3, 1, 2]
    groups = [0, 0, 1, 1, 2, 2]
    # budget 60: group 1 (30 + 10) then group 2 (20 + 3 = 23 > 60 - 40): a new one; group 0 (10 + 45) alone
    plan = plan_micro_batches(prompts, responses, groups, max_tokens=60, max_sequences=8)
    assert plan == [[2, 3], [5, 4], [1, 0]]  # longest responses first inside a group
    # a row cap of 3 and a large budget: groups 1 and 2 do not both fit, group 2 is split after one row
    assert plan_micro_batches(prompts, responses, groups, max_tokens=10**6, max_sequences=3) == \
        [[2, 3, 5], [4, 1, 0]]
    # a group larger than the budget: split, its prompt counted again in the next micro-batch
    assert plan_micro_batches([10, 10], [40, 30], [0, 0], max_tokens=45, max_sequences=8) == [[0], [1]]


def test_every_sequence_is_planned_once_and_micro_batches_respect_both_limits():
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(12).repeat_interleave(5).tolist()
    prompts = [int(x) for x in torch.randint(20, 200, (12,), generator=gen).repeat_interleave(5)]
    responses = LengthProfile(32, 128, seed=1).lengths(torch.arange(60)).tolist()
    plan = plan_micro_batches(prompts, responses, groups, max_tokens=600, max_sequences=16)
    assert sorted(i for mb in plan for i in mb) == list(range(60))
    for mb in plan:
        tokens = sum(responses[i] for i in mb) + sum(prompts[i] for i in {groups[i]: i for i in mb}.values())
        assert len(mb) <= 16 and (tokens <= 600 or len(mb) == 1)
        seen = [groups[i] for i in mb]
        assert seen == sorted(seen, key=seen.index)  # a group's rows are consecutive (the shared-prompt forward)
    even = split_to_count(plan, len(plan) + 3, responses)
    assert len(even) == len(plan) + 3 and sorted(i for mb in even for i in mb) == list(range(60))
    with pytest.raises(ValueError, match="too few sequences"):
        split_to_count([[0], [1]], 3, [1, 1])


def test_buckets_are_the_cheapest_partition_of_the_sorted_rows():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        lengths = torch.randint(1, 120, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        buckets = response_buckets(lengths)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))

        def cost(parts):
            return sum(len(p) * max(lengths[i] for i in p) + BUCKET_OVERHEAD_TOKENS for p in parts)

        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(buckets) == best
    # one very long response apart from many short ones: two buckets, the long one alone
    assert response_buckets([100, 5, 6, 4, 5, 6, 5, 4]) == [[0], [2, 5, 1, 4, 6, 3, 7]]


def _hand_batch(buckets):
    """3 sequences, two of them sharing a prompt: prompts of 3 / 5 real tokens at width 6, responses 2 / 4 / 1
    at width 5."""
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    response_mask = torch.tensor([[1., 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    prompts = PromptBatch(input_ids=torch.zeros(3, 6, dtype=torch.long), attention_mask=prompt_mask,
                          pixel_values=torch.zeros(0, 4), image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
                          images_per_prompt=[0, 0, 0])
    return SequenceBatch(prompts, torch.zeros(3, 5, dtype=torch.long), response_mask,
                         prompt_group=torch.tensor([0, 0, 1]), response_buckets=buckets)


def test_forward_slots_count_the_padding_as_the_forward_lays_it_out():
    real = 3 + 5 + 2 + 4 + 1
    # shared prompts: 2 distinct prompts x width 6, then 3 rows x width 5
    assert forward_slots(_hand_batch(None), shares_prompts=True) == (2 * 6 + 3 * 5, real)
    # buckets [1, 0] at width 4 and [2] at width 1
    assert forward_slots(_hand_batch([torch.tensor([1, 0]), torch.tensor([2])]), True) == (12 + 2 * 4 + 1, real)
    # every row with its prompt (gradient checkpointing): 3 x (6 + 5); real prompts 3 + 3 + 5
    assert forward_slots(_hand_batch(None), shares_prompts=False) == (3 * 11, 3 + 3 + 5 + 7)


def parity_reward(response: str, answer: str) -> dict[str, float]:
    """Varies within a group (the task's reward does not before the answer format is learnt): real advantages."""
    return {"reward": float(len(response) % 2)}


# 4 prompts x 5 responses with imposed long-tailed lengths (median 6, cap 24): the fixed micro-batches of 10 pad
# every response to the step's longest; a budget of 90 tokens splits groups and buckets the responses
RUN = ["trainer.steps=2", "warmup.steps=0", "trainer.prompts_per_step=4", "rollout.n=5", "trainer.micro_batch_size=10",
       "rollout.max_new_tokens=24", "trainer.eval_samples=1", "trainer.save_every=0", "trainer.save_final=false",
       "logging.wandb=false", "logging.plot=false", f"reward.function={__name__}.parity_reward"]


def _run(tmp_path, name: str, *overrides) -> tuple[list[dict], dict, object]:
    from papo_engine.trainer import PAPOTrainer
    cfg = load_config(None, [*RUN, f"trainer.output_dir={tmp_path / name}", *overrides])
    trainer = PAPOTrainer(cfg)
    trainer.sampling.length_profile = LengthProfile(median=6, cap=24, sigma=0.9, seed=2)
    rows = [{k: v for k, v in trainer.train_step(step).items() if not k.startswith("time/")} for step in range(2)]
    trainer.tracker.close()
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    return rows, params, trainer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["papo", "official"])
def test_length_aware_micro_batches_train_as_the_fixed_ones(tmp_path, mode):
    extra = official_overrides() if mode == "official" else []
    fixed = _run(tmp_path, "fixed", "trainer.micro_batch_tokens=0", *extra)
    aware = _run(tmp_path, "aware", "trainer.micro_batch_tokens=90", *extra)
    layout = ("update/padding_fraction", "update/rank_token_imbalance")
    lengths = [r["response_length/max"] for r in fixed[0]]
    assert max(lengths) == 24 and all(r["response_length"] < 12 for r in fixed[0])  # a long tail, as imposed
    for before, after in zip(fixed[0], aware[0]):  # ~57-token prompts, 2 distinct per fixed micro-batch
        assert before["update/padding_fraction"] > 0.3 and after["update/padding_fraction"] < 0.2, (before, after)
    strip = [[{k: v for k, v in r.items() if k not in layout} for r in run[0]] for run in (fixed, aware)]
    assert_within_bounds(run_differences(strip[0], fixed[1], strip[1], aware[1], fixed[2].cfg.optim.lr),
                         f"length-aware vs fixed micro-batches ({mode})")
    assert all(r["grad_norm"] > 0 for r in fixed[0])
    # the length metrics against the imposed lengths (step s holds responses s·20 … s·20 + 19, one rank)
    profile = fixed[2].sampling.length_profile
    for step, row in enumerate(aware[0]):
        lengths = profile.lengths(torch.arange(step * 20, step * 20 + 20)).clamp(max=24).double()
        assert row["response_length"] == pytest.approx(float(lengths.mean()))
        assert row["response_length/max"] == float(lengths.max())
        assert row["response_length/clip_ratio"] == pytest.approx(float((lengths == 24).double().mean()))
        # tokens / row-steps: above a static batch's (every row to the longest), at most 1
        assert float(lengths.sum() / (20 * lengths.max())) < row["rollout/row_utilization"] <= 1
        assert 40 < row["prompt_length"] < 80 and row["prompt_length/max"] >= row["prompt_length"]
