"""The rollout interface every backend implements (verl-style role: it never sees DeepSpeed or the loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from ..models import PromptBatch
from .lengths import LengthProfile


@dataclass
class SamplingParams:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None  # with per-prompt keys: draws depend only on (seed, key, k), not on batch or rank
    min_new_tokens: int = 0  # eos is not sampled before this many tokens (benchmarks: responses of equal length)
    length_profile: LengthProfile | None = None  # benchmarks: each response's length set by its key (lengths.py)


@dataclass
class RolloutOutput:
    """n responses per prompt, prompt-major: row g*n + k is the k-th response to prompt g."""
    response_ids: torch.Tensor    # [B*n, R], pad after the end
    response_mask: torch.Tensor   # [B*n, R] float, 1 up to and including the eos token
    texts: list[str]              # decoded responses, special tokens removed
    logprobs: torch.Tensor | None = None  # [B*n, R] the engine's sampled-token log-probs (vLLM, native), 0 after the end
    row_steps: int | None = None  # decode row-steps computed (native, HF); tokens / row_steps = row utilization


def response_keys(prompt_keys: list[int], n: int) -> torch.Tensor:
    """Key of response k to the prompt keyed p: p * n + k (prompt-major, like the output rows)."""
    return torch.tensor([p * n + k for p in prompt_keys for k in range(n)], dtype=torch.int64)


class RolloutBackend(Protocol):
    def generate(self, prompts: PromptBatch, sampling: SamplingParams,
                 prompt_keys: list[int] | None = None) -> RolloutOutput: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def imposed_lengths(sampling: SamplingParams, prompt_keys: list[int] | None) -> torch.Tensor | None:
    """Each response's length under `sampling.length_profile` [len(prompt_keys)·n], from its key; None without one."""
    if sampling.length_profile is None:
        return None
    if prompt_keys is None:
        raise ValueError("SamplingParams.length_profile sets lengths by response key: pass prompt_keys")
    return sampling.length_profile.lengths(response_keys(prompt_keys, sampling.n)).clamp(max=sampling.max_new_tokens)


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first eos, 0 after it (generate pads finished rows)."""
    is_eos = response_ids == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()
