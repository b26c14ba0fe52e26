"""Response lengths set per response key: a benchmark-only stop rule that every rollout backend honours.

A model with random weights stops at random (its eos has a probability of about 1/V per token), so a decode or a
training step can only be measured at a real run's length distribution if the lengths are imposed. `LengthProfile`
draws one length per response from the response's key — log-normal around `median`, clipped to [1, cap] — so the
same response gets the same length in any batch, on any rank and in every system compared (the key of response k
to the prompt keyed p is p·n + k, `base.response_keys`; TRL's row r of step s has the key s·rows + r when one rank
takes the prompts in order). Honouring it: eos is held back until the row's last token, and that token is eos
(native and HF: at that position only eos keeps its logit, so every sampler draws it; vLLM: min_tokens = max_tokens
= the length, one request per response). The sampled tokens before it are the model's.

With median = cap / 4 and σ = 0.8 (the default), the mean is ~0.34 cap and ~4% of the responses reach the cap:
a static batch computes each row until the longest ends, about 3× the tokens generated.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor

from .sampling import keyed_uniform

LENGTH_STREAM = 0x1E4A7F  # mixed into the seed: the lengths' draws are not the sampler's


@dataclass(frozen=True)
class LengthProfile:
    median: float  # tokens, eos included
    cap: int       # the longest response (rollout.max_new_tokens)
    sigma: float = 0.8
    seed: int = 0

    def __post_init__(self):
        if not (self.median >= 1 and self.cap >= 1 and self.sigma >= 0):
            raise ValueError(f"LengthProfile needs median >= 1, cap >= 1, sigma >= 0; got {self}")

    def lengths(self, keys: torch.Tensor) -> torch.Tensor:
        """Length of each response [len(keys)], int64 in [1, cap]: median · exp(σ·z), z a standard normal
        quantile drawn from (seed, key)."""
        u = keyed_uniform(self.seed ^ LENGTH_STREAM, keys.to(torch.int64), 0)            # float64 in (0, 1)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        drawn = torch.round(self.median * torch.exp(self.sigma * z))
        return drawn.clamp(1, self.cap).to(torch.int64)

    def describe(self) -> dict:
        return asdict(self)


def force_lengths(logits: torch.Tensor, lengths: torch.Tensor, position: int, eos: int) -> torch.Tensor:
    """`logits` [rows, V] of response token `position` (0 = the first), edited in place: eos at −inf on rows whose
    length is not reached yet, every token but eos at −inf on rows whose last token this is. Returns `logits`."""
    lengths = lengths.to(logits.device)
    logits[lengths > position + 1, eos] = float("-inf")
    last = lengths == position + 1
    if bool(last.any()):
        eos_logit = logits[last, eos].clone()
        logits[last] = float("-inf")
        logits[last, eos] = eos_logit
    return logits


class ImposedLengths(LogitsProcessor):
    """`force_lengths` as an HF logits processor (before the sampler): row i of the generate call ends at
    `lengths[i]` tokens."""

    def __init__(self, lengths: torch.Tensor, eos: int, prompt_width: int):
        self.lengths, self.eos, self.prompt_width = lengths, eos, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return force_lengths(scores, self.lengths, input_ids.shape[1] - self.prompt_width, self.eos)
