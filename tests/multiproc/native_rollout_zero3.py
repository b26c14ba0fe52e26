"""Run under `torchrun --nproc_per_node 2`: under DeepSpeed ZeRO-3 each rank generates its half of 4 prompts with the
native rollout (keyed); the union equals one process generating all 4 without DeepSpeed. The eos-prone tiny model
makes the ranks' responses end at different steps (each rank decodes on its own, weights gathered once).
Rank 0 writes a JSON verdict to argv[1]."""
import copy
import json
import sys

import torch
import torch.distributed as dist

from papo_engine.distributed import init_distributed


def main(out_path: str) -> None:
    rank, world = init_distributed()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from model_copies import eos_prone
    from test_native_rollout import mixed_prompts

    from papo_engine.batching import select_prompts
    from papo_engine.config import load_config
    from papo_engine.engine import TrainingEngine
    from papo_engine.head import FusedLMHead
    from papo_engine.models import load_image_processor, load_policy, load_tokenizer
    from papo_engine.rollout.base import SamplingParams
    from papo_engine.rollout.native import NativeRollout

    cfg = load_config(None, ["deepspeed.zero_stage=3"])
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    prompts = mixed_prompts(tokenizer, processor)
    model = eos_prone(model, tokenizer, prompts, logit=4.0)  # most rows end early
    reference = copy.deepcopy(model).eval()  # the same weights, one process, no DeepSpeed
    keys = [5, 6, 7, 8]
    # the first seed whose two halves end at different steps (every rank computes the same on its own copy)
    for seed in range(200):
        sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=seed)
        one = NativeRollout(reference, tokenizer, batch_size=64).generate(prompts, sampling, prompt_keys=keys)
        ends = [int(one.response_mask[4 * r:4 * r + 4].sum(1).max()) for r in range(2)]
        if ends[0] != ends[1]:
            break
    engine = TrainingEngine(model, cfg, world)
    mine = [2 * rank, 2 * rank + 1]
    out = NativeRollout(engine.module, tokenizer, batch_size=64).generate(
        select_prompts(prompts, mine), sampling, prompt_keys=[keys[i] for i in mine])
    gathered = [None] * world
    dist.all_gather_object(gathered, {"texts": out.texts, "steps": out.response_ids.shape[1],
                                      "logprobs": out.logprobs.tolist()})
    if rank == 0:
        diff = 0.0
        for r, g in enumerate(gathered):
            lp = torch.tensor(g["logprobs"])
            ref = one.logprobs[4 * r:4 * r + 4, :lp.shape[1]]
            diff = max(diff, float((lp - ref).abs().max()))
        verdict = {"partitioned": hasattr(engine.module.lm_head.weight, "ds_id"),
                   "ranks_texts": [t for g in gathered for t in g["texts"]], "one_process_texts": one.texts,
                   "steps_per_rank": [g["steps"] for g in gathered], "max_logprob_diff": diff}
        with open(out_path, "w") as f:
            json.dump(verdict, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
