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
