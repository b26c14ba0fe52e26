"""Run under `torchrun --nproc_per_node 2`: under DeepSpeed ZeRO-3 (lm_head.weight partitioned), the fused and
the eager head give the same loss and the same full gradients, and both match one process without DeepSpeed.
Rank 0 writes a JSON verdict to argv[1]."""
import copy
import json
import sys

import torch

from papo_engine.distributed import init_distributed


def main(out_path: str) -> None:
    rank, world = init_distributed()
    from deepspeed.utils import safe_get_full_grad

    from papo_engine.actor import SequenceBatch, response_token_stats
    from papo_engine.batching import repeat_prompts
    from papo_engine.config import load_config
    from papo_engine.data import GeneratedDataset
    from papo_engine.engine import TrainingEngine
    from papo_engine.head import FusedLMHead
    from papo_engine.masking import mask_per_prompt
    from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer

    cfg = load_config(None, ["deepspeed.zero_stage=3", "trainer.micro_batch_size=4"])
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="auto")
    reference = copy.deepcopy(model)  # same seed-0 weights, no DeepSpeed

    ds = GeneratedDataset("shape_color", "train", 8, seed=0, image_size=56)
    samples = [ds[i] for i in range(4)]
    prompts = encode_prompts([s.question for s in samples], [[s.image] for s in samples], tokenizer, processor)
    gen = torch.Generator().manual_seed(1)
    masked, _, _ = mask_per_prompt(prompts.pixel_values, prompts.image_grid_thw, 2, 0.6, generator=gen,
                                   image_mean=processor.image_mean, image_std=processor.image_std)
    response_ids = torch.randint(0, 500, (8, 6), generator=gen)
    full = SequenceBatch(repeat_prompts(prompts, 2), response_ids, torch.ones(8, 6), masked)

    def loss_of(module, batch):
        stats = response_token_stats(module, batch, both_branches=True, temperature=0.9)
        return (stats["logprobs"].sum() - 0.3 * stats["kl"].sum() + 0.1 * stats["entropy"].sum()
                + 0.2 * stats["masked_entropy"].sum() + 0.5 * stats["masked_logprobs"].sum())

    engine = TrainingEngine(model, cfg, world)
    mine = full.slice(rank * 4, rank * 4 + 4)
    results = {}
    for fused in (True, False):
        engine.module.lm_head.fused = fused
        loss = loss_of(engine.module, mine)
        engine.backward(loss, last_micro_batch=True)  # DeepSpeed averages over ranks
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.engine.optimizer.zero_grad()
        losses = [torch.zeros(()) for _ in range(world)]
        torch.distributed.all_gather(losses, loss.detach())
        results[fused] = (sum(float(x) for x in losses), grads)

    if rank == 0:
        ref_loss = loss_of(reference, full) / world
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        verdict = {"loss_fused": results[True][0] / world, "loss_eager": results[False][0] / world,
                   "loss_reference": ref_loss.item(), "max_rel_err": {}}
        for name, g_ref in ref_grads.items():
            scale = g_ref.abs().max().clamp(min=1e-12)
            verdict["max_rel_err"][name] = max(float((results[f][1][name] - g_ref).abs().max() / scale)
                                               for f in (True, False))
        verdict["lm_head_grad_norm"] = float(results[True][1]["lm_head.weight"].norm())  # not silently lost
        with open(out_path, "w") as f:
            json.dump(verdict, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
