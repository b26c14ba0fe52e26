"""Run under `torchrun --nproc_per_node 2`: ZeRO-3 with deepspeed.offload_states_during_rollout gets DeepSpeed's
FusedAdam (ZeRO-3's offload_states() accepts nothing else), and the rollout-time offload (everything but the
parameters, then the parameters, as HybridEngine does) followed by reload_states() changes nothing: two optimizer
steps give bit-identical parameters with and without the offload in between (both with FusedAdam). Rank 0 writes
a verdict to argv[1]."""
import copy
import json
import sys

import torch

from papo_engine.distributed import init_distributed


def train(engine, batch, offload: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(this rank's parameter partitions before, after) two optimizer steps."""
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    from papo_engine.actor import response_token_stats
    before = [p.ds_tensor.detach().clone() for p in engine.module.parameters()]
    for _ in range(2):
        if offload:
            params = OffloadStateTypeEnum.lp_params
            engine.engine.offload_states(include=[s for s in OffloadStateTypeEnum if s != params])
            engine.engine.offload_states(include=[params])
            engine.engine.reload_states()
        engine.start_micro_batch()
        stats = response_token_stats(engine.module, batch, both_branches=False, temperature=1.0)
        engine.backward(-(stats["logprobs"] * batch.response_mask).sum() / batch.response_mask.sum(), True)
        engine.step()
    return before, [p.ds_tensor.detach().clone() for p in engine.module.parameters()]


def main(out_path: str) -> None:
    rank, world = init_distributed()
    from papo_engine.actor import SequenceBatch
    from papo_engine.batching import repeat_prompts
    from papo_engine.config import load_config
    from papo_engine.data import GeneratedDataset
    from papo_engine.engine import TrainingEngine
    from papo_engine.head import FusedLMHead
    from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer

    cfg = load_config(None, ["deepspeed.zero_stage=3", "trainer.micro_batch_size=4", "kernels.backend=torch"])
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    ds = GeneratedDataset("shape_color", "train", 4, seed=0, image_size=56)
    prompts = encode_prompts([ds[i].question for i in range(2)], [ds[i].images for i in range(2)], tokenizer,
                             processor)
    response_ids = torch.randint(0, 300, (4, 5), generator=torch.Generator().manual_seed(rank))
    batch = SequenceBatch(repeat_prompts(prompts, 2), response_ids, torch.ones(4, 5))
    without_flag = type(TrainingEngine(copy.deepcopy(model), cfg, world).optimizer.optimizer).__name__
    cfg.deepspeed.offload_states_during_rollout = True  # set after validation: the rollout backend is not built
    results, optimizers = {}, {}
    for offload in (False, True):
        engine = TrainingEngine(copy.deepcopy(model), cfg, world)
        optimizers[offload] = type(engine.optimizer.optimizer).__name__
        results[offload] = train(engine, batch, offload)
    if rank == 0:
        (_, plain), (before, offloaded) = results[False], results[True]
        json.dump({"optimizers": optimizers, "without_flag": without_flag,
                   "identical": all(torch.equal(a, b) for a, b in zip(plain, offloaded)),
                   "trained": any(not torch.equal(a, b) for a, b in zip(before, offloaded))}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
