"""Keyed sampling: each response's random draw depends only on (seed, its key, position), never on the batch.

HF `generate` samples with one global RNG stream, so a response depends on which other prompts share its
batch — and so on the number of ranks the prompts were split over. Here each row draws ONE counter-based uniform
per token, u = hash(seed, key, position), and takes the token where the cumulative distribution of
softmax(logits / T) (restricted to the top-p nucleus when top_p < 1) first exceeds u: inverse-CDF sampling, an
exact sample from that distribution, and the same key gives the same response in any batch on any rank. Its
cost per token is one hash per row plus a cumulative sum over the vocabulary (a Gumbel-max draw needs one hash per
row and vocabulary entry: 4.9 M a token at Qwen's 151,936 × 32 rows). Every backend that samples from the
trainer's module (`hf`, `native`) calls `keyed_sample`, so they draw the same tokens under the same keys.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (lowbias32-style; multipliers < 2^31 so int64 products never overflow)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(seed: int, keys: torch.Tensor, position: int) -> torch.Tensor:
    """u in (0, 1), shape [len(keys)], float64: a pure function of (seed, key, position)."""
    keys = keys.to(torch.int64)
    row = _mix32(_mix32(torch.tensor(seed, dtype=torch.int64, device=keys.device)) ^ (keys & _MASK32))
    row = _mix32(row ^ (keys >> 32))
    h = _mix32(_mix32(row ^ position) + row)
    return (h.to(torch.float64) + 0.5) / 2.0 ** 32


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """−inf outside the smallest set of tokens whose probability reaches top_p (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p  # mass BEFORE this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def inverse_cdf_sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Token ids [rows]: row i's draw from softmax(top_p_filter(logits_i / T)) at quantile u_i (u in (0, 1)).

    The cumulative sum runs in token-id order in float64; `right` search picks the first token whose cumulative
    mass exceeds u · total, which is never a token of probability 0 (the sum does not rise there)."""
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(-1)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def keyed_sample(logits: torch.Tensor, seed: int, keys: torch.Tensor, position: int, temperature: float,
                 top_p: float) -> torch.Tensor:
    """The keyed draw of response token `position` (0 = the first generated token) for rows keyed `keys`."""
    return inverse_cdf_sample(logits, temperature, top_p, keyed_uniform(seed, keys.to(logits.device), position))


class KeyedSampler(LogitsProcessor):
    """Turns HF greedy decoding into keyed sampling at `temperature`/`top_p`, row i keyed by `keys[i]`: the scores
    come back 0 at the drawn token and −inf elsewhere, so greedy's argmax takes it."""

    def __init__(self, keys: torch.Tensor, seed: int, temperature: float, top_p: float, prompt_width: int):
        self.keys, self.seed = keys, seed
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width  # tokens generated so far (prompts are left-padded)
        tokens = keyed_sample(scores, self.seed, self.keys, position, self.temperature, self.top_p)
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, tokens.unsqueeze(1), 0.0)
