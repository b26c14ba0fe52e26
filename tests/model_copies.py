"""Model copies with other weights, shared by the stand-in tests and the real-vLLM checks."""
import copy

import torch


def perturbed(model, seed=1):
    """A copy with different weights everywhere, and a negated lm_head (greedy tokens change for sure)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.lm_head.weight.neg_()
    return m


def eos_prone(model, tokenizer, prompts, logit: float = 3.0):
    """A copy whose eos row of lm_head points along the mean final hidden state of `prompts` (a PromptBatch), with
    eos's logit about `logit` there: sampled responses then end at different steps (some early, some at the end)."""
    from papo_engine.actor import final_hidden

    m = copy.deepcopy(model)
    with torch.no_grad():
        hidden = final_hidden(m, prompts.input_ids, prompts.attention_mask, prompts.pixel_values,
                              prompts.image_grid_thw)
        mean = hidden[prompts.attention_mask.bool()].mean(0)
        m.lm_head.weight[tokenizer.eos_token_id] = logit * mean / mean.norm() ** 2
    return m
