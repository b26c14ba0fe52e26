"""A step's experience (`Rollouts`) and DAPO dynamic sampling: keep only the informative prompt groups (rewards
that differ — a group with equal rewards has zero advantages and teaches nothing — or, the authors' criterion, a
mean accuracy strictly between 0.01 and 0.99) and regenerate, in bounded rounds, until every rank has its share
of informative groups again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from .actor import SequenceBatch
from .algorithms.advantages import groups_to_keep
from .batching import concat_prompts, select_prompts
from .models import PromptBatch


@dataclass
class Rollouts:
    """One step's experience, prompt-major (row g*n + k = k-th response to prompt g)."""
    prompts: PromptBatch     # the B prompts (un-repeated)
    prompt_keys: list[int]   # each prompt's global draw index: seeds its sampling and its mask on any rank
    answers: list[str]
    sequences: SequenceBatch
    scores: dict[str, torch.Tensor]
    texts: list[str]
    rollout_logprobs: torch.Tensor | None = None  # [B*n, R] the engine's (vLLM); not carried through merge_groups


def collect_informative_groups(draw_batch: Callable[[], Rollouts], per_rank: int, n: int, max_rounds: int,
                               pad_token_id: int, metric: str = "reward") -> tuple[Rollouts, dict]:
    """`draw_batch()` generates and scores a fresh batch of this rank's prompts (collective under ZeRO-3).
    Returns `per_rank` groups, informative ones first in draw order, and the dynamic_sampling/* metrics.
    `metric`: what makes a group informative (`algorithms.advantages.groups_to_keep`): "reward" = its rewards
    differ, "accuracy" = its mean accuracy is in (0.01, 0.99) (the authors' filter)."""
    kept, dropped, rounds = [], 0, 1
    pieces = [draw_batch()]
    while True:
        keep = groups_to_keep(pieces[-1].scores, n, metric)
        dropped += int((~keep).sum())
        kept.extend((len(pieces) - 1, g) for g in torch.nonzero(keep).flatten().tolist())
        # collective: every rank generates in every round (ZeRO-3 generation gathers parameters together)
        short = dist_utils.all_reduce_sum(float(len(kept) < per_rank))
        if short == 0 or rounds >= max_rounds:
            break
        pieces.append(draw_batch())
        rounds += 1
    info = {"dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/rounds": rounds,
            "dynamic_sampling/kept_groups": min(len(kept), per_rank)}
    if not kept:  # nothing informative at all: train on the last batch (zero advantages, no-op pg)
        return pieces[-1], info
    kept = kept[:per_rank]
    # every rank trains on per_rank groups (equal micro-batch counts keep DeepSpeed's collectives in step):
    # missing groups are copies of kept ones with their responses masked out, so they add nothing
    padding = per_rank - len(kept)
    batch = merge_groups(pieces, kept + [kept[i % len(kept)] for i in range(padding)], n, pad_token_id)
    if padding:
        batch.sequences.response_mask[-padding * n:] = 0
    info["dynamic_sampling/padding_groups"] = padding
    return batch, info


def merge_groups(pieces: list[Rollouts], kept: list[tuple[int, int]], n: int, pad_token_id: int) -> Rollouts:
    """One batch from group `g` of piece `i` for each (i, g) in `kept`, in that order."""
    groups = []
    for piece_id, g in kept:
        p, rows = pieces[piece_id], list(range(g * n, (g + 1) * n))
        groups.append(Rollouts(select_prompts(p.prompts, [g]), [p.prompt_keys[g]], [p.answers[g]],
                               SequenceBatch(select_prompts(p.sequences.prompts, rows),
                                             p.sequences.response_ids[rows], p.sequences.response_mask[rows]),
                               {k: v[rows] for k, v in p.scores.items()}, [p.texts[r] for r in rows]))
    width = max(x.sequences.response_ids.shape[1] for x in groups)

    def right_pad(t: torch.Tensor, value) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    sequences = SequenceBatch(concat_prompts([x.sequences.prompts for x in groups], pad_token_id),
                              torch.cat([right_pad(x.sequences.response_ids, pad_token_id) for x in groups]),
                              torch.cat([right_pad(x.sequences.response_mask, 0.0) for x in groups]),
                              prompt_group=torch.arange(len(groups)).repeat_interleave(n))
    return Rollouts(concat_prompts([x.prompts for x in groups], pad_token_id), [k for x in groups for k in x.prompt_keys],
                    [a for x in groups for a in x.answers],
                    sequences, {k: torch.cat([x.scores[k] for x in groups]) for k in groups[0].scores},
                    [t for x in groups for t in x.texts])
