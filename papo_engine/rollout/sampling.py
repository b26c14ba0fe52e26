"""Keyed sampling: each response's random draws depend only on (seed, its key, position), never on the batch.

HF `generate` samples with one global RNG stream, so a response depends on which other prompts share its
batch — and so on the number of ranks the prompts were split over. Here sampling is the Gumbel-max trick with
counter-based noise: token = argmax(logits / T + g), g = −log(−log u), u = hash(seed, key, position, token id).
argmax of logits plus i.i.d. Gumbel noise is an exact sample from softmax(logits / T) (restricted to the top-p
nucleus when top_p < 1), and the same key gives the same response in any batch on any rank. Decoding then runs
in HF's greedy mode with this processor supplying the noise.
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


def keyed_uniform(seed: int, keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """u in (0, 1), shape [len(keys), vocab], a pure function of (seed, key, position, token id)."""
    keys = keys.to(torch.int64).view(-1, 1)
    row = _mix32(_mix32(torch.tensor(seed, dtype=torch.int64)) ^ (keys & _MASK32))
    row = _mix32(row ^ (keys >> 32))
    row = _mix32(row ^ position)
    tokens = torch.arange(vocab, dtype=torch.int64, device=keys.device).view(1, -1)
    h = _mix32(_mix32(row ^ tokens) + row)
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


class KeyedGumbelSampler(LogitsProcessor):
    """Turns HF greedy decoding into sampling at `temperature`/`top_p`, row i keyed by `keys[i]`."""

    def __init__(self, keys: torch.Tensor, seed: int, temperature: float, top_p: float, prompt_width: int):
        self.keys, self.seed = keys, seed
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width  # tokens generated so far (prompts are left-padded)
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        u = keyed_uniform(self.seed, self.keys.to(scores.device), position, scores.shape[-1])
        return logits + (-torch.log(-torch.log(u))).to(logits.dtype)
