"""The policy forward: one 2B batch equals two separate forwards; log-probs match a plain logits computation."""
import torch

from papo_engine.actor import SequenceBatch, final_hidden, response_token_stats, with_prompt_positions
from papo_engine.batching import repeat_prompts
from papo_engine.data import GeneratedDataset
from papo_engine.masking import mask_per_prompt
from papo_engine.models import encode_prompts


def _batch(tiny, prompts=3, n=2, seed=0):
    cfg, tokenizer, processor, model = tiny
    ds = GeneratedDataset("shape_color", "train", 16, seed=0, image_size=56)
    samples = [ds[i] for i in range(prompts)]
    pb = encode_prompts([s.question for s in samples], [[s.image] for s in samples], tokenizer, processor)
    gen = torch.Generator().manual_seed(seed)
    response_ids = torch.randint(0, 400, (prompts * n, 7), generator=gen)
    response_mask = torch.ones(prompts * n, 7)
    response_mask[0, 5:] = 0
    response_mask[-1, 2:] = 0
    masked, _, _ = mask_per_prompt(pb.pixel_values, pb.image_grid_thw, n, 0.6, generator=gen,
                                   image_mean=processor.image_mean, image_std=processor.image_std)
    return SequenceBatch(repeat_prompts(pb, n), response_ids, response_mask, masked)


def _plain_logprobs(model, batch, pixel_values):
    """Reference: model logits for the whole sequence, log_softmax, gather — no fused head, no stacking."""
    p = batch.prompts
    ids = torch.cat([p.input_ids, batch.response_ids], 1)
    att = torch.cat([p.attention_mask, batch.response_mask.long()], 1)
    hidden = final_hidden(model, ids, att, pixel_values, p.image_grid_thw)
    logits = model.lm_head(hidden).double()
    P, R = p.input_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:P - 1 + R], -1)
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


@torch.no_grad()
def test_one_batched_forward_equals_two_forwards(tiny):
    model = tiny[3].eval()
    batch = _batch(tiny)
    stats = response_token_stats(model, batch, both_branches=True, temperature=1.0)
    orig = _plain_logprobs(model, batch, batch.prompts.pixel_values)
    masked = _plain_logprobs(model, batch, batch.masked_pixel_values)
    assert torch.allclose(stats["logprobs"].double(), orig, atol=1e-5, rtol=0)
    assert torch.allclose(stats["masked_logprobs"].double(), masked, atol=1e-5, rtol=0)
    assert not torch.allclose(orig, masked, atol=1e-4)  # the mask really changes the policy
    assert (stats["kl"][batch.response_mask.bool()] >= -1e-6).all()
    assert (stats["logprobs"][batch.response_mask == 0] == 0).all()


@torch.no_grad()
def test_left_padding_does_not_change_logprobs(tiny):
    """A prompt alone gives the same per-token log-probs as inside a padded batch (M-RoPE positions intact)."""
    model = tiny[3].eval()
    batch = _batch(tiny, prompts=3, n=1)
    together = response_token_stats(model, batch, both_branches=False, temperature=1.0)["logprobs"]
    for i in range(3):
        single = batch.slice(i, i + 1)
        keep = single.prompts.attention_mask[0].bool()
        single.prompts.input_ids = single.prompts.input_ids[:, keep]
        single.prompts.attention_mask = single.prompts.attention_mask[:, keep]
        alone = response_token_stats(model, single, both_branches=False, temperature=1.0)["logprobs"]
        assert torch.allclose(alone[0], together[i], atol=1e-5), i


def test_fused_and_unfused_head_give_same_loss_gradients(tiny):
    model = tiny[3].train()
    batch = _batch(tiny)
    grads = {}
    for fused in (True, False):
        model.lm_head.fused = fused
        model.zero_grad(set_to_none=True)
        stats = response_token_stats(model, batch, both_branches=True, temperature=0.9)
        loss = (stats["logprobs"].sum() - 0.3 * stats["kl"].sum() + 0.1 * stats["entropy"].sum()
                + 0.2 * stats["masked_entropy"].sum() + 0.5 * stats["masked_logprobs"].sum())
        loss.backward()
        grads[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.lm_head.fused = True
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-5)
    for name, g in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], g, rtol=1e-4, atol=1e-6), name


def stats_and_gradients(model, batch):
    """Both branches' token stats and every parameter's gradient of a loss that uses all four of them."""
    model.zero_grad(set_to_none=True)
    stats = response_token_stats(model, batch, both_branches=True, temperature=0.9)
    loss = (stats["logprobs"].sum() - 0.3 * stats["kl"].sum() + 0.1 * stats["entropy"].sum()
            + 0.5 * stats["masked_logprobs"].sum())
    loss.backward()
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _with_groups(batch, n):
    from dataclasses import replace
    groups = torch.arange(len(batch) // n).repeat_interleave(n)
    return replace(batch, prompt_group=groups)


def test_shared_prompt_forward_equals_the_full_forward_values_and_gradients(tiny):
    """Each prompt once per branch + its KV cache expanded to the n responses = one full forward per sequence,
    for the values and for every parameter's gradient; also on a slice that cuts a prompt's group."""
    model = tiny[3].train()

    def run(batch):
        return stats_and_gradients(model, batch)

    plain = _batch(tiny, prompts=3, n=3)
    grouped = _with_groups(plain, 3)
    positioned = with_prompt_positions(model, grouped)  # the step's positions, computed once and sliced
    assert positioned.prompt_positions.shape == (3, 9, plain.prompts.input_ids.shape[1])
    assert torch.equal(positioned.slice(2, 8).prompt_positions,
                       with_prompt_positions(model, grouped.slice(2, 8)).prompt_positions)
    for full_batch, shared_batch, positioned_batch in ((plain, grouped, positioned),
                                                       (plain.slice(2, 8), grouped.slice(2, 8), positioned.slice(2, 8))):
        (full, full_grads), (shared, shared_grads) = run(full_batch), run(shared_batch)
        for key in full:
            assert torch.allclose(shared[key], full[key], atol=1e-5, rtol=0), key
        assert full_grads.keys() == shared_grads.keys()
        for name, g in full_grads.items():  # atol: fp32 summation order on gradients up to ~20 (eps * 20 = 2e-6)
            assert torch.allclose(shared_grads[name], g, rtol=1e-4, atol=1e-5), name
        with_positions, with_positions_grads = run(positioned_batch)  # the same integers: the same computation
        assert all(torch.equal(with_positions[key], shared[key]) for key in shared)
        assert all(torch.equal(with_positions_grads[name], g) for name, g in shared_grads.items())
