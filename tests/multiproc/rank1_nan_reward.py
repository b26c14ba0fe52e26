"""A reward function for tests: the default reward, except NaN for every response scored on rank 1 (a broken
reward that shows up in only one rank's share of the batch)."""
import torch.distributed as dist

from papo_engine.rewards import accuracy_format_reward


def rank1_nan_reward(response: str, answer: str) -> dict:
    scores = accuracy_format_reward(response, answer)
    if dist.is_initialized() and dist.get_rank() == 1:
        scores["reward"] = float("nan")
    return scores
