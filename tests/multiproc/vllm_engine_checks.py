"""Real vLLM (the CPU build) against the trainer, in a process of its own (the in-process engine binds threads and
initializes torch.distributed): writes a JSON verdict that tests/test_vllm_real.py asserts item by item.

    python tests/multiproc/vllm_engine_checks.py OUT.json WORK_DIR
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from model_copies import perturbed  # noqa: E402


def main(out_path: str, work: str) -> None:
    from papo_engine.actor import SequenceBatch, response_token_stats
    from papo_engine.batching import repeat_prompts, select_prompts
    from papo_engine.config import Config
    from papo_engine.data import GeneratedDataset
    from papo_engine.head import FusedLMHead
    from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer
    from papo_engine.rollout.base import SamplingParams
    from papo_engine.rollout.hf import HFRollout
    from papo_engine.rollout.vllm import CPU_MAX_BATCHED_TOKENS, VLLMRollout
    from papo_engine.weight_sync import iter_weight_buckets

    cfg = Config()
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0).eval()
    model_dir = Path(work) / "tiny_hf"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    cfg.model.path = str(model_dir)
    cfg.rollout.backend = "vllm"
    cfg.rollout.enforce_eager = True
    cfg.rollout.kv_cache_mb = 64
    ds = GeneratedDataset("shape_color", "train", 8, seed=0, image_size=56)
    samples = [ds[i] for i in range(3)]
    prompts = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    v: dict = {}

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # as under `papo eval`: the backend must provide them
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    rollout = VLLMRollout(cfg, tokenizer)
    v["rng_preserved"] = (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    llm = rollout.llm
    vc = llm.llm_engine.vllm_config
    v["engine"] = {
        "executor": vc.parallel_config.distributed_executor_backend,
        "chunked_prefill": bool(vc.scheduler_config.enable_chunked_prefill),
        "max_num_batched_tokens": int(vc.scheduler_config.max_num_batched_tokens),
        "logprobs_mode": str(vc.model_config.logprobs_mode),
        "sleep_mode": bool(vc.model_config.enable_sleep_mode),
        "kv_cache_memory_bytes": vc.cache_config.kv_cache_memory_bytes,
        "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "rank_env": os.environ.get("RANK"),
        "min_batched": CPU_MAX_BATCHED_TOKENS,
        "on_cpu": rollout.on_cpu, "rollout_sleep_mode": rollout.sleep_mode,
    }

    # the engine's expanded prompts are the trainer's, token for token
    requests, _ = rollout._requests(prompts)
    seen = llm.generate(requests, rollout._sampling_params(SamplingParams(1, 0.0, 1.0, 1)), use_tqdm=False)
    trainer_ids = [prompts.input_ids[b][prompts.attention_mask[b].bool()].tolist() for b in range(3)]
    v["expanded_prompts_equal"] = [list(r.prompt_token_ids) == ids for r, ids in zip(seen, trainer_ids)]

    # caches reset after every generate (counted on the real methods)
    resets = {"prefix": [], "mm": 0, "encoder": 0}
    real_prefix, real_mm, real_enc = llm.reset_prefix_cache, llm.reset_mm_cache, llm.llm_engine.reset_encoder_cache

    def prefix(*a, **k):
        resets["prefix"].append(bool(real_prefix(*a, **k)))

    def mm():
        resets["mm"] += 1
        real_mm()

    def enc():
        resets["encoder"] += 1
        real_enc()

    llm.reset_prefix_cache, llm.reset_mm_cache, llm.llm_engine.reset_encoder_cache = prefix, mm, enc

    greedy = SamplingParams(3, 0.0, 1.0, 6)  # greedy with n > 1: one request, copied
    base = rollout.generate(prompts, greedy)
    v["resets_after_generate"] = resets
    v["greedy_copies_identical"] = all(torch.equal(base.response_ids[3 * g], base.response_ids[3 * g + k])
                                       for g in range(3) for k in range(3))
    hf_base = HFRollout(model, tokenizer, 64).generate(prompts, greedy)
    v["greedy_equals_hf"] = torch.equal(base.response_ids, hf_base.response_ids)

    # push perturbed weights (small whole-layer buckets): outputs change and follow the trainer
    trainer = perturbed(model)
    v["sync_check_before_push"] = rollout.sync_check(prompts, trainer)
    stats = rollout.sync_weights(iter_weight_buckets(trainer, 0, 48 * 1024))
    v["push_buckets"] = stats["buckets"]
    pushed = rollout.generate(prompts, greedy)
    v["push_changed_outputs"] = not torch.equal(pushed.response_ids, base.response_ids)
    v["pushed_equals_hf"] = torch.equal(
        pushed.response_ids, HFRollout(trainer, tokenizer, 64).generate(prompts, greedy).response_ids)
    v["sync_check_after_push"] = rollout.sync_check(prompts, trainer)

    # sampled-token log-probs: vLLM vs a float64 reference from the trainer's hidden states. The rollout suppresses
    # vision tokens (logit bias -100): its distribution is the trainer's renormalized without them, a real
    # difference from the trainer's log-probs (logged in training as the rollout mismatch).
    from papo_engine.actor import response_hidden
    vision = torch.tensor(rollout.suppress)
    diffs, suppression = {}, {}
    for temperature in (1.0, 0.7):
        sampling = SamplingParams(2, temperature, 1.0, 8, seed=3)
        out = rollout.generate(prompts, sampling, prompt_keys=[0, 1, 2])
        seqs = SequenceBatch(repeat_prompts(prompts, 2), out.response_ids, out.response_mask)
        with torch.no_grad():
            logits = response_hidden(trainer, seqs, False).double() @ trainer.lm_head.weight.double().T / temperature
            full = torch.log_softmax(logits, -1)
            logits[..., vision] = float("-inf")
            suppressed = torch.log_softmax(logits, -1)
            fp32 = response_token_stats(trainer, seqs, both_branches=False, temperature=temperature)["logprobs"]
        valid = out.response_mask.bool()
        ids = out.response_ids.unsqueeze(-1)
        ref = suppressed.gather(-1, ids).squeeze(-1)
        diffs[str(temperature)] = float((ref - out.logprobs.double()).abs()[valid].max())
        suppression[str(temperature)] = {
            "trainer_fp32_vs_float64": float((full.gather(-1, ids).squeeze(-1) - fp32.double()).abs()[valid].max()),
            "mean_abs_suppression_shift": float((ref - full.gather(-1, ids).squeeze(-1)).abs()[valid].mean())}
    v["logprob_max_abs_diff"] = diffs
    v["suppression"] = suppression

    # keyed sampling: a prompt's responses do not depend on the batch it is in
    keyed = SamplingParams(2, 1.0, 1.0, 6, seed=7)
    together = rollout.generate(prompts, keyed, prompt_keys=[40, 41, 42])
    alone = rollout.generate(select_prompts(prompts, [1]), keyed, prompt_keys=[41])
    reordered = rollout.generate(select_prompts(prompts, [2, 1, 0]), keyed, prompt_keys=[42, 41, 40])

    def same(a, b):
        w = min(a.shape[1], b.shape[1])
        return torch.equal(a[:, :w], b[:, :w]) and not a[:, w:].ne(tokenizer.pad_token_id).any() \
            and not b[:, w:].ne(tokenizer.pad_token_id).any()

    other_key = rollout.generate(select_prompts(prompts, [1]), keyed, prompt_keys=[99])
    v["keyed"] = {"alone": same(alone.response_ids, together.response_ids[2:4]),
                  "reordered": same(reordered.response_ids[2:4], together.response_ids[2:4]),
                  "other_key_differs": not same(other_key.response_ids, alone.response_ids)}
    # a bigger batch (16 prompts x 8 samples, keyed) must not crash the CPU sampler
    many = encode_prompts([ds[i % 8].question for i in range(16)], [ds[i % 8].images for i in range(16)],
                          tokenizer, processor)
    v["keyed_16x8_rows"] = rollout.generate(many, SamplingParams(8, 1.0, 1.0, 4, seed=1),
                                            prompt_keys=list(range(16))).response_ids.shape[0]

    # LoRA: the adapters (nonzero, on the language model and the vision tower) are folded into the pushed weights
    # under the plain layers' names; the engine then generates what HF generate does on the adapted module
    import copy
    from papo_engine import lora
    from papo_engine.config import LoraSettings
    adapted = lora.apply_lora(copy.deepcopy(model), LoraSettings(rank=4, vision_target_modules=["qkv"]), model_dir)
    generator = torch.Generator().manual_seed(5)
    for name, param in adapted.named_parameters():
        if ".lora_B." in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    pushed_names = [name for bucket in iter_weight_buckets(adapted, 0, 48 * 1024) for name, _ in bucket]
    v["lora_push_names_are_the_checkpoints"] = sorted(pushed_names) == sorted(
        name for bucket in iter_weight_buckets(model, 0, 48 * 1024) for name, _ in bucket)
    rollout.sync_weights(iter_weight_buckets(adapted, 0, 48 * 1024))
    lora_out = rollout.generate(prompts, greedy)
    v["lora_push_changed_outputs"] = not torch.equal(lora_out.response_ids, base.response_ids)
    v["lora_pushed_equals_hf"] = torch.equal(
        lora_out.response_ids, HFRollout(adapted, tokenizer, 64).generate(prompts, greedy).response_ids)
    v["lora_sync_check"] = rollout.sync_check(prompts, adapted)

    # push the checkpoint's weights back: the first outputs return exactly
    rollout.sync_weights(iter_weight_buckets(model, 0, 48 * 1024))
    restored = rollout.generate(prompts, greedy)
    v["restored_exactly"] = torch.equal(restored.response_ids, base.response_ids) and \
        torch.equal(restored.logprobs, base.logprobs)
    Path(out_path).write_text(json.dumps(v))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
