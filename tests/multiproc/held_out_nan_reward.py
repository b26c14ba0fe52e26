"""The held-out evaluation's scoring with a reward that is NaN on rank 1 only (generation stubbed out: every rank
answers "red"). Each rank records the error it raised; rank 0 writes them. Usage: held_out_nan_reward.py OUT_JSON"""
import datetime
import json
import sys
from types import SimpleNamespace

import torch.distributed as dist

from papo_engine.config import Config, ConfigError
from papo_engine.data import Sample
from papo_engine.evaluation import held_out_accuracy
from papo_engine.rewards import RewardRole, accuracy_format_reward

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()


def nan_on_rank1(response: str, answer: str, **weights) -> dict:
    scores = accuracy_format_reward(response, answer, **weights)
    if rank == 1:
        scores["reward"] = float("nan")
    return scores


cfg = Config()
cfg.trainer.eval_samples = 4
reward = RewardRole(cfg)
reward.fn = nan_on_rank1
trainer = SimpleNamespace(
    cfg=cfg, rank=rank, world=2, eval_set=[Sample(images=[], question="?", answer="red", uid=str(i)) for i in range(4)],
    sampling=SimpleNamespace(max_new_tokens=4), encode=lambda chunk: chunk, reward=reward,
    hybrid=SimpleNamespace(generate=lambda prompts, params: SimpleNamespace(texts=["\\boxed{red}"] * len(prompts))))
try:
    held_out_accuracy(trainer)
    error = None
except ConfigError as err:
    error = str(err)
errors = [None, None]
dist.all_gather_object(errors, error)  # both ranks are here only if they stopped at the same point
if rank == 0:
    json.dump({"errors": errors}, open(sys.argv[1], "w"))
dist.destroy_process_group()
