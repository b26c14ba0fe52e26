"""Stage 0 (documented, optional): a short supervised warm-start on the answer FORMAT and on looking at the image.

Real PAPO starts from an instruction-tuned VLM that already answers as `<think>…</think>\\boxed{…}` and already
perceives; the embedded tiny model starts from random weights. This stage stands in for that pretraining:
the target is `<think>{caption}</think>\\boxed{X}</s>` where the caption says what the image shows but NOT the
answer (the shape's type for the colour task). At the answer position the loss is −log Σ_{a ∈ answer set} π(a):
it teaches that the box holds one of the task's answers and says nothing about WHICH one, so no image→answer
mapping is taught (training on random labels instead was measured to actively teach the answer position to
ignore the image). A balance term keeps the answers spread (a policy stuck on one answer gives GRPO groups with no
reward variance): by default every image's answer distribution is pulled to uniform (`answer_balance=image`;
`batch` pulls only the batch average, the stage's behaviour before 2026-11-26).

`attribute_probe` (default on): a linear probe, trained here and then thrown away, reads the asked attribute (the
colour) from the hidden state that predicts the answer token. A pretrained VLM's representation carries what the
image shows; without the probe, whether the tiny model's answer position carries the colour after this stage is
left to chance, and RL then waits for it (learning onsets from step ~30 to never within 200 steps, measured). The
probe's labels reach the representation only: the LM head is never shown which answer token goes with which
colour, and with `answer_balance=image` the policy still starts at chance on every image. Everything it learns
about the mapping from the colour to the answer comes from RL.
"""
from __future__ import annotations

import math
import random

import torch
from tqdm import tqdm

from . import distributed as dist_utils
from .actor import SequenceBatch, response_hidden
from .config import WarmupConfig
from .data import ANSWERS

TEMPLATE = "<think>{caption}</think>\\boxed{{{answer}}}"


def format_targets(tokenizer, captions: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids ending with eos, and their mask."""
    rows = [tokenizer(TEMPLATE.format(caption=c, answer=a), add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for c, a in zip(captions, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def answer_balance(within: torch.Tensor, over: str) -> torch.Tensor:
    """How far the answer distributions `within` [B, K] (each row sums to 1) are from uniform: for "image" the
    mean over rows of KL(uniform ‖ row), for "batch" KL(uniform ‖ mean row). Both are ≥ 0; "batch" is 0 for any
    balanced set of rows (even one-hot ones), "image" only when every row is uniform."""
    rows = within if over == "image" else within.mean(0, keepdim=True)
    return -torch.log(rows).mean() - math.log(within.shape[1])


def answer_token_ids(tokenizer, choices: list[str]) -> list[int]:
    """The one token of each answer (the warm-start scores the answer position as a single token)."""
    pieces = [tokenizer.tokenize(a) for a in choices]
    if any(len(p) != 1 for p in pieces):
        raise ValueError(f"warm-up needs single-token answers; the tokenizer splits {choices} into {pieces}")
    return tokenizer.convert_tokens_to_ids([p[0] for p in pieces])


def answer_positions(ids: torch.Tensor, answer_ids: torch.Tensor, brace_id: int) -> torch.Tensor:
    """[B, R] bool: the answer token inside `\\boxed{…}` (an answer id right after "{")."""
    after_brace = (ids.roll(1, 1) == brace_id) & (torch.arange(ids.shape[1], device=ids.device) > 0)
    return torch.isin(ids, answer_ids) & after_brace


def format_warmup(model, trainer, wcfg: WarmupConfig, stop_check=None) -> list[dict]:
    """Runs before DeepSpeed wraps the model; every rank runs the same seeded stage, so weights stay equal.
    `stop_check(steps_done)` is called after every step on every rank (the trainer's SIGTERM/SIGINT stop point)."""
    cfg = trainer.cfg
    rng = random.Random(cfg.trainer.seed + 7)
    choices = ANSWERS[cfg.data.task]
    device = next(model.parameters()).device
    probe = torch.nn.Linear(model.lm_head.in_features, len(choices)).to(device) if wcfg.attribute_probe else None
    optimizer = torch.optim.AdamW([*model.parameters(), *(probe.parameters() if probe else [])], lr=wcfg.lr)
    model.train()
    log = []
    bar = tqdm(range(wcfg.steps), desc="format warm-up", disable=not dist_utils.is_main(), dynamic_ncols=True)
    answer_ids = torch.tensor(answer_token_ids(trainer.tokenizer, choices), device=device)
    brace_id = trainer.tokenizer.convert_tokens_to_ids("{")
    for step in bar:
        samples = [trainer.train_set[rng.randrange(len(trainer.train_set))] for _ in range(wcfg.batch_size)]
        # a random answer fills the box so every answer is seen as INPUT (the closing tokens follow any of them);
        # its position is scored by the answer-set loss, never by this label
        ids, mask = format_targets(trainer.tokenizer, [s.caption for s in samples],
                                   [rng.choice(choices) for _ in samples])
        seqs = SequenceBatch(trainer.encode(samples), ids, mask).to(device)
        ids, mask = seqs.response_ids, seqs.response_mask
        hidden = response_hidden(model, seqs, both_branches=False)
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        token_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        answer_set_logp = torch.logsumexp(logp[..., answer_ids], dim=-1)
        is_answer = answer_positions(ids, answer_ids, brace_id)
        per_token = torch.where(is_answer, answer_set_logp, token_logp)
        within = torch.softmax(logp[is_answer][:, answer_ids], dim=-1)           # [B, K]
        loss = -(per_token * mask).sum() / mask.sum() + answer_balance(within, wcfg.answer_balance)
        if probe is not None:
            truth = torch.tensor([choices.index(s.answer) for s in samples], device=device)
            loss = loss + torch.nn.functional.cross_entropy(probe(hidden[is_answer].float()), truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        log.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
        if stop_check is not None:
            stop_check(step + 1)
    optimizer.zero_grad(set_to_none=True)
    return log
