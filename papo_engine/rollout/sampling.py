"""Keyed sampling: each response's random draw depends only on (seed, its key, position), never on the batch.

HF `generate` samples with one global RNG stream, so a response depends on which other prompts share its
batch — and so on the number of ranks the prompts were split over. Here each row draws ONE counter-based uniform
per token, u = hash(seed, key, position), and takes the token where the cumulative distribution of
softmax(logits / T) (restricted to the top-p nucleus when top_p < 1) first exceeds u: inverse-CDF sampling, an
exact sample from that distribution, and the same key gives the same response in any batch on any rank. Its
cost per token is one short hash per row (the (seed, key) part is hashed once per rollout: `row_streams`) plus one
pass over the vocabulary (a Gumbel-max draw needs one hash per row and vocabulary entry: 4.9 M a token at Qwen's
151,936 × 32 rows). Every backend that samples from the
trainer's module (`hf`, `native`) calls `keyed_sample`, so they draw the same tokens under the same keys.

On a float32 CPU tensor with top_p = 1 the draw runs as one C++ op (`papo_kernels.cpp_backend.keyed_sample_cpp`:
two passes over the vocabulary instead of torch's ~8, the same arithmetic); `inverse_cdf_sample`'s torch code is
its reference (tests/test_sampling.py compares them) and runs everywhere else.
"""
from __future__ import annotations

import math

import torch
from papo_kernels import cpp_backend
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


def row_streams(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """One 32-bit stream state per row [len(keys)], int64: a pure function of (seed, key). Computed once per
    rollout; each token then costs two mixes (`stream_uniform`)."""
    keys = keys.to(torch.int64)
    row = _mix32(_mix32(torch.tensor(seed, dtype=torch.int64, device=keys.device)) ^ (keys & _MASK32))
    return _mix32(row ^ (keys >> 32))


def stream_uniform(streams: torch.Tensor, position: int) -> torch.Tensor:
    """u in (0, 1), float64, one per row: a pure function of the row's stream and the position."""
    h = _mix32(_mix32(streams ^ position) + streams)
    return (h.to(torch.float64) + 0.5) / 2.0 ** 32


def keyed_uniform(seed: int, keys: torch.Tensor, position: int) -> torch.Tensor:
    """u in (0, 1), shape [len(keys)], float64: a pure function of (seed, key, position)."""
    return stream_uniform(row_streams(seed, keys), position)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """−inf outside the smallest set of tokens whose probability reaches top_p (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p  # mass BEFORE this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def block_size(vocab: int) -> int:
    """Vocabulary entries per block of the two-level search below: the power of two nearest above √V, so the
    two levels cost about the same (576 entries: 32; Qwen's 151,936: 512). A block wider than the vocabulary would
    make the second level a pass over padding (at 576 entries a 1,024-wide block was most of a draw's time)."""
    return max(16, 1 << math.ceil(math.log2(math.sqrt(vocab))))


def cpu_kernel_draws(logits: torch.Tensor, top_p: float) -> bool:
    """Whether a draw from `logits` runs as the C++ op (see the module docstring)."""
    return (top_p >= 1.0 and logits.device.type == "cpu" and logits.dtype == torch.float32
            and cpp_backend.is_available("decode"))


def kernel_draw(logits: torch.Tensor, temperature: float, u: torch.Tensor, banned: torch.Tensor | None = None,
                eos: int = 0, eos_rule: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ draw (`cpu_kernel_draws` must hold): (tokens [rows], logsumexp(logits / T) [rows] over every token)
    from logits [rows, V] left as they are; `banned` token ids never drawn, eos per row by `eos_rule` (int8: 0
    allowed, 1 not, 2 the only token)."""
    rows, vocab = logits.shape
    return cpp_backend.keyed_sample_cpp(
        logits.contiguous(), u.to(torch.float64).contiguous(), float(temperature), block_size(vocab),
        torch.zeros(0, dtype=torch.long) if banned is None else banned.to(torch.long).contiguous(), eos,
        torch.zeros(rows, dtype=torch.int8) if eos_rule is None else eos_rule.to(torch.int8).contiguous())


def inverse_cdf_sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Token ids [rows]: row i's draw from softmax(top_p_filter(logits_i / T)) at quantile u_i (u in (0, 1)).

    The weights exp(logit / T − max) are searched in token-id order in two levels — the cumulative (float64) sum
    of the sums of blocks of `block_size(V)` tokens, then the cumulative sum inside the one block that holds the
    quantile — so a draw costs one pass over the vocabulary plus two short cumulative sums, not a cumulative sum
    over it (at 151,936 × 32 rows, a float64 cumsum was most of a decode step). The token taken is the first whose
    cumulative weight reaches u · total, which is never a token of weight 0 (the cumulative weight does not rise
    there). On a float32 CPU tensor at top_p = 1: the C++ op (`kernel_draw`)."""
    if cpu_kernel_draws(logits, top_p):
        return kernel_draw(logits, temperature, u)[0]
    return inverse_cdf_sample_torch(logits, temperature, top_p, u)


def inverse_cdf_sample_torch(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """`inverse_cdf_sample` in torch (the C++ op's reference; any device, dtype and top_p)."""
    rows, vocab = logits.shape
    x = logits.float()
    x = top_p_filter(x / temperature if temperature != 1.0 else x, top_p)
    weights = torch.exp(x - x.amax(-1, keepdim=True))                                     # [rows, V]
    width = block_size(vocab)
    full = vocab // width
    sums = weights[:, :full * width].view(rows, full, width).sum(-1)
    if vocab > full * width:
        sums = torch.cat([sums, weights[:, full * width:].sum(-1, keepdim=True)], 1)
    block_cdf = sums.double().cumsum(-1)                                                  # [rows, blocks]
    blocks = block_cdf.shape[1]
    target = u.to(block_cdf.device, torch.float64) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target.unsqueeze(1), right=True).squeeze(1).clamp(max=blocks - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    index = block.unsqueeze(1) * width + torch.arange(width, device=weights.device)       # [rows, width]
    if vocab % width:  # the last block is short: its missing entries weigh 0
        inside = weights.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0.0)
    else:
        inside = weights.gather(1, index)
    inside = inside.cumsum(-1, dtype=torch.float64) + before.unsqueeze(1)
    # strictly above the mass before the block, at most its end (the two sums round differently)
    target = torch.minimum(torch.maximum(target, torch.nextafter(before, torch.full_like(before, 2.0))),
                           inside[:, -1])
    offset = torch.searchsorted(inside, target.unsqueeze(1)).squeeze(1)
    return (block * width + offset).clamp(max=vocab - 1)


def keyed_sample(logits: torch.Tensor, streams: torch.Tensor, position: int, temperature: float,
                 top_p: float) -> torch.Tensor:
    """The keyed draw of response token `position` (0 = the first generated token) for rows whose
    `row_streams(seed, keys)` are `streams`."""
    return inverse_cdf_sample(logits, temperature, top_p, stream_uniform(streams.to(logits.device), position))


class KeyedSampler(LogitsProcessor):
    """Turns HF greedy decoding into keyed sampling at `temperature`/`top_p`, row i keyed by `keys[i]`: the scores
    come back 0 at the drawn token and −inf elsewhere, so greedy's argmax takes it."""

    def __init__(self, keys: torch.Tensor, seed: int, temperature: float, top_p: float, prompt_width: int):
        self.streams = row_streams(seed, keys)
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width  # tokens generated so far (prompts are left-padded)
        tokens = keyed_sample(scores, self.streams, position, self.temperature, self.top_p)
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, tokens.unsqueeze(1), 0.0)
