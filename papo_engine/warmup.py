"""Stage 0 (documented, optional): a short supervised warm-start on the answer FORMAT only.

Real PAPO starts from an instruction-tuned model that already answers as `<think>…</think>\\boxed{…}`; the
embedded tiny model starts from random weights. This stage teaches the format with answers drawn uniformly
at random from the task's answer set — independent of the image — so after it the policy is at chance
accuracy and everything it learns about the image comes from RL.
"""
from __future__ import annotations

import random

import torch
from tqdm import tqdm

from . import distributed as dist_utils
from .actor import SequenceBatch, response_token_stats
from .config import WarmupConfig
from .data import ANSWERS

TEMPLATE = "<think>I look at the image.</think>\\boxed{{{answer}}}"


def format_targets(tokenizer, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids ending with eos, and their mask."""
    rows = [tokenizer(TEMPLATE.format(answer=a), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def format_warmup(model, trainer, wcfg: WarmupConfig) -> list[dict]:
    """Runs before DeepSpeed wraps the model; every rank runs the same seeded stage, so weights stay equal."""
    cfg = trainer.cfg
    rng = random.Random(cfg.trainer.seed + 7)
    choices = ANSWERS[cfg.data.task]
    optimizer = torch.optim.AdamW(model.parameters(), lr=wcfg.lr)
    model.train()
    log = []
    bar = tqdm(range(wcfg.steps), desc="format warm-up", disable=not dist_utils.is_main(), dynamic_ncols=True)
    for step in bar:
        samples = [trainer.train_set[rng.randrange(len(trainer.train_set))] for _ in range(wcfg.batch_size)]
        ids, mask = format_targets(trainer.tokenizer, [rng.choice(choices) for _ in samples])
        seqs = SequenceBatch(trainer.encode(samples), ids, mask)
        stats = response_token_stats(model, seqs, both_branches=False, temperature=1.0)
        loss = -(stats["logprobs"] * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        log.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    optimizer.zero_grad(set_to_none=True)
    return log
