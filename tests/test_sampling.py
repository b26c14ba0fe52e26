"""Keyed inverse-CDF sampling: exact softmax(logits / T) (and top-p) frequencies, one uniform per row and token, and
a response that depends only on its key, not on its batch — what makes a 2-rank run sample what a 1-rank run
samples."""
import torch

from papo_engine.batching import select_prompts
from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts
from papo_engine.rollout.base import SamplingParams
from papo_engine.rollout.hf import HFRollout
from papo_engine.rollout.sampling import KeyedSampler, inverse_cdf_sample, keyed_uniform, top_p_filter


def _draw(logits: torch.Tensor, rows: int, temperature: float, top_p: float, seed: int = 5) -> torch.Tensor:
    sampler = KeyedSampler(torch.arange(rows), seed, temperature, top_p, prompt_width=3)
    scores = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1).clone())
    assert (torch.isinf(scores).sum(1) == logits.shape[-1] - 1).all()  # one finite score: the drawn token
    return scores.argmax(-1)


def test_frequencies_match_softmax_with_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    rows = 40000
    for temperature in (1.0, 0.7):
        counts = torch.bincount(_draw(logits, rows, temperature, 1.0), minlength=5).double()
        expected = torch.softmax(logits.double() / temperature, -1) * rows
        sigma = (expected * (1 - expected / rows)).sqrt()
        assert ((counts - expected).abs() < 4 * sigma).all(), (counts, expected)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [False, False, True, True]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [False, True, True, True]
    draws = _draw(logits, 20000, 1.0, 0.8)
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[2:].sum() == 0 and abs(counts[0] - 0.625) < 0.02  # renormalized 0.5 / 0.8


def test_uniform_is_a_function_of_seed_key_position():
    keys = torch.tensor([3, 11, 2**40 + 7])
    a = keyed_uniform(1, keys, 4)
    assert a.shape == (3,) and a.dtype == torch.float64
    assert torch.equal(a[1:2], keyed_uniform(1, keys[1:2], 4))   # batch-independent
    assert not torch.equal(a, keyed_uniform(1, keys, 5))          # position matters
    assert not torch.equal(a, keyed_uniform(2, keys, 4))          # seed matters
    many = keyed_uniform(0, torch.arange(20000), 0)
    assert ((many > 0) & (many < 1)).all() and abs(float(many.mean()) - 0.5) < 0.01


def test_inverse_cdf_quantiles_and_zero_probability_tokens():
    """Hand-computed: a quantile goes to the first token whose cumulative mass reaches it, never to a token of
    probability 0. Weights (1, 0, 1) are exact in fp32 (exp(0), exp(−inf)), so the tie at 0.5 is exact: 0.5 goes
    to token 0, just above it to token 2, never to token 1. With (0.5, 0, 0.3, 0.2) the fp32 exp rounds by a few
    ulps, which CPUs do differently (AVX2 against AVX-512), so those quantiles stay 1e-6 off the edges."""
    exact = torch.tensor([0.0, float("-inf"), 0.0]).expand(3, -1)
    at_tie = torch.tensor([0.5, 0.5 + 1e-12, 0.25], dtype=torch.float64)
    assert inverse_cdf_sample(exact, 1.0, 1.0, at_tie).tolist() == [0, 2, 0]
    logits = torch.log(torch.tensor([0.5, 0.0, 0.3, 0.2])).expand(6, -1)
    u = torch.tensor([0.1, 0.5 - 1e-6, 0.5 + 1e-6, 0.79, 0.81, 0.999], dtype=torch.float64)
    assert inverse_cdf_sample(logits, 1.0, 1.0, u).tolist() == [0, 0, 2, 2, 3, 3]


def test_two_level_search_equals_one_cumulative_sum_across_blocks():
    """Over many vocabulary blocks (block_size(V) entries each, the last one short) the two-level search takes the
    token a single float64 cumulative sum over the whole vocabulary takes, zero-probability blocks and block edges
    included."""
    from papo_engine.rollout.sampling import block_size
    g = torch.Generator().manual_seed(0)
    vocab = 3 * 1024 + 17
    BLOCK = block_size(vocab)
    assert vocab % BLOCK and vocab // BLOCK > 3
    logits = torch.randn(64, vocab, generator=g) * 3
    logits[:, BLOCK:2 * BLOCK] = float("-inf")  # a whole block of probability 0
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:4] = torch.tensor([1e-12, 1 - 1e-12, 0.5, 0.25], dtype=torch.float64)
    probs = torch.softmax(logits.double(), -1)
    cdf = probs.cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    drawn = inverse_cdf_sample(logits, 1.0, 1.0, u)
    assert torch.equal(drawn, expected)
    assert not ((drawn >= BLOCK) & (drawn < 2 * BLOCK)).any()


def test_responses_do_not_depend_on_batch_composition(tiny):
    _, tokenizer, processor, model = tiny
    samples = [GeneratedDataset("shape_color", "train", 6, 0, 56)[i] for i in range(6)]
    prompts = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    rollout = HFRollout(model, tokenizer, batch_size=64)
    sampling = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=123)
    keys = [100 + i for i in range(6)]
    together = rollout.generate(prompts, sampling, prompt_keys=keys)
    halves = [rollout.generate(select_prompts(prompts, idx), sampling, prompt_keys=[keys[i] for i in idx])
              for idx in ([0, 1, 2], [3, 4, 5])]
    texts = halves[0].texts + halves[1].texts
    assert together.texts == texts
    assert len(set(together.texts)) > 6  # it samples: the n responses to a prompt differ
    other_seed = rollout.generate(prompts, SamplingParams(3, 1.0, 1.0, 10, seed=124), prompt_keys=keys)
    assert other_seed.texts != together.texts


def test_the_cpu_op_draws_what_the_torch_reference_draws():
    """The C++ draw (float32 CPU, top_p = 1: `kernel_draw`) against `inverse_cdf_sample_torch` on the logits with the
    same rules written in: vision-like tokens banned, eos held back on some rows and the only token on others; and
    its normalizer against torch's logsumexp over every token (before any ban)."""
    from papo_engine.rollout.sampling import inverse_cdf_sample_torch, kernel_draw
    g = torch.Generator().manual_seed(1)
    for vocab, temperature in ((576, 1.0), (3 * 1024 + 17, 0.7), (151936, 1.0)):
        rows, eos = 24, 7
        logits = torch.randn(rows, vocab, generator=g) * 4
        logits[0, 3] = 50.0  # the largest logit banned: the weights' shift is not the normalizer's
        banned = torch.tensor([3, 11, vocab - 1])
        rule = torch.tensor([0, 1, 2] * (rows // 3), dtype=torch.int8)
        u = torch.rand(rows, generator=g, dtype=torch.float64)
        u[:3] = torch.tensor([1e-12, 1 - 1e-12, 0.5], dtype=torch.float64)
        ruled = logits.clone()
        ruled[:, banned] = float("-inf")
        ruled[rule == 1, eos] = float("-inf")
        ruled[rule == 2] = torch.where(torch.arange(vocab) == eos, ruled[rule == 2], float("-inf"))
        tokens, lse = kernel_draw(logits, temperature, u, banned, eos, rule)
        assert torch.equal(tokens, inverse_cdf_sample_torch(ruled, temperature, 1.0, u)), vocab
        assert torch.equal(tokens[rule == 2], torch.full(((rule == 2).sum(),), eos))
        assert torch.allclose(lse, torch.logsumexp(logits.double() / temperature, -1).float(), atol=1e-5, rtol=0)
