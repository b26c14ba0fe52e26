"""The native rollout (`rollout.backend=native`) against HF generate and the trainer's forward: the same tokens under
keyed sampling (prompts of different lengths, two images in one prompt, eos mid-way, top-p, greedy), log-probs
equal to the trainer's, its CUDA-graph-shaped step equal to the plain one, and 2 ZeRO-3 ranks equal to 1 process."""
import pytest
import torch

from papo_engine.actor import SequenceBatch, prefill, prompt_positions, response_token_stats
from papo_engine.batching import repeat_prompts, select_prompts
from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts
from papo_engine.rollout.base import SamplingParams
from papo_engine.rollout.decoder import TextDecoder
from papo_engine.rollout.hf import HFRollout
from papo_engine.rollout.native import NativeRollout

from model_copies import eos_prone
from two_ranks import run_two_ranks


def mixed_prompts(tokenizer, processor):
    """Prompts of different lengths: 56- and 84-px images (4 and 9 image tokens) and one prompt with two images."""
    small = GeneratedDataset("shape_color", "train", 4, 0, 56)
    large = GeneratedDataset("shape_color", "train", 4, 1, 84)
    questions = [small[0].question, large[0].question, small[1].question, "Compare the two shapes."]
    images = [[small[0].image], [large[0].image], [small[1].image], [small[2].image, large[1].image]]
    return encode_prompts(questions, images, tokenizer, processor)


@pytest.fixture(scope="module")
def setup(tiny):
    cfg, tokenizer, processor, model = tiny
    prompts = mixed_prompts(tokenizer, processor)
    return tokenizer, eos_prone(model, tokenizer, prompts).eval(), prompts


CASES = {"T=1": (1.0, 1.0), "T=0.7, top_p=0.8": (0.7, 0.8), "greedy": (0.0, 1.0)}


@pytest.mark.parametrize("case", list(CASES))
def test_native_draws_the_tokens_hf_generate_draws(setup, case):
    tokenizer, model, prompts = setup
    temperature, top_p = CASES[case]
    sampling = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=12, seed=11)
    keys = [5, 6, 7, 8]
    hf = HFRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=keys)
    native = NativeRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=keys)
    assert torch.equal(native.response_ids, hf.response_ids)
    assert torch.equal(native.response_mask, hf.response_mask)
    assert native.texts == hf.texts
    lengths = native.response_mask.sum(1)
    if temperature > 0:  # the case the fixture is built for: some rows stop early, some run to the end
        assert (lengths < 12).any() and (lengths == 12).any(), lengths
        assert len(set(native.texts)) > len(keys)  # it samples: a prompt's responses differ


def test_native_log_probs_equal_the_trainers(setup):
    tokenizer, model, prompts = setup
    sampling = SamplingParams(n=3, temperature=0.8, top_p=1.0, max_new_tokens=10, seed=3)
    out = NativeRollout(model, tokenizer, batch_size=64).generate(prompts, sampling, prompt_keys=[0, 1, 2, 3])
    groups = torch.arange(4).repeat_interleave(3)
    batch = SequenceBatch(repeat_prompts(prompts, 3), out.response_ids, out.response_mask, prompt_group=groups)
    with torch.no_grad():
        trainer = response_token_stats(model, batch, both_branches=False, temperature=0.8)["logprobs"]
    valid = out.response_mask.bool()
    assert valid.sum() > 20
    assert (out.logprobs[~valid] == 0).all()
    assert torch.allclose(out.logprobs[valid], trainer[valid], atol=1e-5, rtol=0), \
        (out.logprobs[valid] - trainer[valid]).abs().max()


def test_responses_do_not_depend_on_batch_or_chunking(setup):
    tokenizer, model, prompts = setup
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=21)
    keys = [40, 41, 42, 43]
    together = NativeRollout(model, tokenizer, batch_size=64).generate(prompts, sampling, prompt_keys=keys)
    one_prompt_per_call = NativeRollout(model, tokenizer, batch_size=2).generate(prompts, sampling, prompt_keys=keys)
    assert together.texts == one_prompt_per_call.texts
    alone = NativeRollout(model, tokenizer, batch_size=64).generate(select_prompts(prompts, [2]), sampling,
                                                                   prompt_keys=[42])
    assert alone.texts == together.texts[4:6]


def test_min_new_tokens_holds_eos_back_in_both_backends(setup):
    tokenizer, model, prompts = setup
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=9, seed=2, min_new_tokens=9)
    hf = HFRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=[0, 1, 2, 3])
    native = NativeRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=[0, 1, 2, 3])
    assert torch.equal(native.response_ids, hf.response_ids)
    assert (native.response_mask.sum(1) == 9).all()


def test_unkeyed_sampling_and_greedy_copies(setup):
    tokenizer, model, prompts = setup
    native = NativeRollout(model, tokenizer, batch_size=64)
    torch.manual_seed(0)
    first = native.generate(prompts, SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6))
    torch.manual_seed(0)
    again = native.generate(prompts, SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6))
    assert first.texts == again.texts and len(set(first.texts)) > 4
    greedy = native.generate(prompts, SamplingParams(n=3, temperature=0.0, top_p=1.0, max_new_tokens=6))
    assert greedy.logprobs is None
    for g in range(4):
        assert len(set(greedy.texts[3 * g:3 * g + 3])) == 1


def test_the_fixed_shape_step_of_the_cuda_graph_equals_the_plain_step(setup):
    """The graphed step attends over every slot of the cache with the mask alone; run here without the capture."""
    tokenizer, model, prompts = setup
    positions = prompt_positions(model, prompts)
    rows_from = torch.arange(4).repeat_interleave(2)
    steps = 5
    P = prompts.input_ids.shape[1]
    plain, full = (TextDecoder(model, 8, P + steps) for _ in range(2))
    with torch.no_grad():
        hidden, cache = prefill(model, prompts.input_ids, prompts.attention_mask, positions, prompts.pixel_values,
                                prompts.image_grid_thw)
        for decoder in (plain, full):
            decoder.fill_prompt(cache, 2, prompts.attention_mask)
        start = positions.amax(dim=(0, 2))[rows_from] + 1
        tokens = torch.randint(0, 500, (8,), generator=torch.Generator().manual_seed(0))
        for t in range(steps):
            slot = torch.tensor([P + t])
            a = plain.step(tokens, start + t, slot, width=P + t + 1)
            b = full.step(tokens, start + t, slot, width=P + steps)
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
            tokens = a.argmax(-1)


@pytest.mark.slow
def test_two_zero3_ranks_generate_what_one_process_generates(tmp_path):
    """Each rank decodes its own prompts with the text weights gathered once; ranks stop at different steps."""
    verdict = run_two_ranks("native_rollout_zero3.py", tmp_path)
    assert verdict["partitioned"], "the test must run with ZeRO-3-partitioned weights"
    assert verdict["ranks_texts"] == verdict["one_process_texts"]
    assert verdict["steps_per_rank"][0] != verdict["steps_per_rank"][1], verdict["steps_per_rank"]
    assert verdict["max_logprob_diff"] < 1e-5
