"""The native rollout (`rollout.backend=native`) against HF generate and the trainer's forward: the same tokens under
keyed sampling (prompts of different lengths, two images in one prompt, eos mid-way, top-p, greedy), log-probs
equal to the trainer's, its CUDA-graph-shaped step equal to the plain one, and 2 ZeRO-3 ranks equal to 1 process."""
import pytest
import torch

from papo_engine.actor import SequenceBatch, prefill, prompt_positions, response_token_stats
from papo_engine.batching import repeat_prompts, select_prompts
from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts
from papo_engine.rollout.base import SamplingParams, response_keys
from papo_engine.rollout.decoder import TextDecoder, row_buckets, width_bucket
from papo_engine.rollout.hf import HFRollout
from papo_engine.rollout.lengths import LengthProfile
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


def test_imposed_lengths_end_every_row_at_its_length_with_the_same_tokens_as_hf(setup):
    """A benchmark's LengthProfile: each response ends exactly at its key's length (eos there, never before), in
    both backends, with the same tokens; the native decode drops the finished rows (fewer row-steps than HF's)."""
    tokenizer, model, prompts = setup
    profile = LengthProfile(median=4, cap=14, sigma=0.9, seed=3)
    sampling = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=14, seed=5, length_profile=profile)
    keys = [10, 11, 12, 13]
    hf = HFRollout(model, tokenizer, batch_size=16).generate(prompts, sampling, prompt_keys=keys)
    native = NativeRollout(model, tokenizer, batch_size=16).generate(prompts, sampling, prompt_keys=keys)
    lengths = profile.lengths(response_keys(keys, 4))
    assert len(set(lengths.tolist())) > 4 and int(lengths.max()) == 14, lengths  # uneven, some at the cap
    assert torch.equal(native.response_mask.sum(1).long(), lengths)
    assert (native.response_ids.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) == tokenizer.eos_token_id).all()
    assert torch.equal(native.response_ids, hf.response_ids)
    assert hf.row_steps == 16 * 14
    assert int(lengths.sum()) <= native.row_steps < hf.row_steps


def test_compaction_and_the_graph_width_keep_each_rows_logits(setup):
    """The decoder's step at a CUDA graph's width (slots beyond the written ones masked) and after compaction (the
    unfinished rows moved to the front of a smaller batch, spare rows added) gives each row the logits of the plain
    step over all rows (run here without the capture)."""
    tokenizer, model, prompts = setup
    positions = prompt_positions(model, prompts)
    n, steps = 3, 6
    B, P = prompts.input_ids.shape
    plain, graph_width, compacted = (TextDecoder(model, B, n, P, steps) for _ in range(3))
    with torch.no_grad():
        hidden, cache = prefill(model, prompts.input_ids, prompts.attention_mask, positions, prompts.pixel_values,
                                prompts.image_grid_thw)
        for decoder in (plain, graph_width, compacted):
            decoder.fill_prompt(cache, prompts.attention_mask)
        start = positions.amax(dim=(0, 2)).repeat_interleave(n) + 1
        tokens = torch.randint(0, 500, (B * n,), generator=torch.Generator().manual_seed(0))
        # before step 3, rows 1, 4, 5, 9 stay (prompts 0, 1, 3: prompt 2 leaves), in a batch of 8 (a row_buckets size)
        keep = torch.tensor([1, 4, 5, 9])
        batch = torch.cat([keep, keep[-1:].expand(4)])
        assert 8 in row_buckets(B * n)
        for t in range(steps):
            slot = torch.tensor([t])
            a = plain.step(tokens, start + t, slot, width=t + 1)
            b = graph_width.step(tokens, start + t, slot, width=width_bucket(t + 1, steps))
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
            if t < 3:
                c = compacted.step(tokens, start + t, slot, width=t + 1)
                assert torch.allclose(a, c, atol=1e-5, rtol=1e-5)
            else:
                if t == 3:
                    assert torch.equal(compacted.compact(keep, 8, written=t), batch)
                c = compacted.step(tokens[batch], start[batch] + t, slot, width=t + 1)
                assert torch.allclose(a[keep], c[:4], atol=1e-5, rtol=1e-5), (a[keep] - c[:4]).abs().max()
            tokens = a.argmax(-1)


@pytest.mark.slow
def test_two_zero3_ranks_generate_what_one_process_generates(tmp_path):
    """Each rank decodes its own prompts with the text weights gathered once; ranks stop at different steps."""
    verdict = run_two_ranks("native_rollout_zero3.py", tmp_path)
    assert verdict["partitioned"], "the test must run with ZeRO-3-partitioned weights"
    assert verdict["ranks_texts"] == verdict["one_process_texts"]
    assert verdict["steps_per_rank"][0] != verdict["steps_per_rank"][1], verdict["steps_per_rank"]
    assert verdict["max_logprob_diff"] < 1e-5
