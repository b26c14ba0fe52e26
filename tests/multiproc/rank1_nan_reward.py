"""A reward function for tests: the default reward, except NaN for every response scored on rank 1 after its first
call (a broken reward that shows up in only one rank's share of the batch, mid-run: the first call is the trainer's
start-up check of the reward function, which it passes)."""
import torch.distributed as dist

from papo_engine.rewards import accuracy_format_reward

calls = {"count": 0}


def rank1_nan_reward(response: str, answer: str) -> dict:
    scores = accuracy_format_reward(response, answer)
    calls["count"] += 1
    if dist.is_initialized() and dist.get_rank() == 1 and calls["count"] > 1:
        scores["reward"] = float("nan")
    return scores
