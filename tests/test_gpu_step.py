"""What the GPU training benchmark relies on, checked on the CPU: the released architectures (shapes and parameter
counts of the published Qwen2.5-VL checkpoints), the batch moves to the training device, and the benchmark script
itself at tiny shapes (its numbers on a GPU are in benchmarks/results/gpu_step_<device>.json)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from papo_engine.actor import SequenceBatch
from papo_engine.batching import repeat_prompts
from papo_engine.config import ConfigError, ModelConfig, load_config
from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts, load_tokenizer, max_positions, released_config

ROOT = Path(__file__).resolve().parents[1]
# parameter counts of the published checkpoints (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct)
PUBLISHED = {"qwen2.5-vl-3b": (3_754_622_976, 151936, True), "qwen2.5-vl-7b": (8_292_166_656, 152064, False)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_released_architecture_matches_the_published_checkpoint(name):
    params, vocab, tied = PUBLISHED[name]
    tokenizer = load_tokenizer(ModelConfig())
    config = released_config(name, tokenizer)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.lm_head.weight.shape[0] == vocab
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert max_positions(ModelConfig(architecture=name)) == 128000


def test_architecture_with_a_checkpoint_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.architecture='qwen2.5-vl-3b' with model.path set"):
        load_config(None, [f"model.path={tmp_path}", "model.architecture=qwen2.5-vl-3b"])
    with pytest.raises(ConfigError, match="model.architecture='qwen2.5-vl-9b': must be one of tiny"):
        load_config(None, ["model.architecture=qwen2.5-vl-9b"])


def test_sequence_batch_moves_every_tensor_the_forward_reads():
    from papo_engine.models import load_image_processor
    cfg = load_config(None, [])
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    data = GeneratedDataset("shape_color", "train", 2, 0, 56)
    prompts = encode_prompts([data[i].question for i in range(2)], [data[i].images for i in range(2)], tokenizer,
                             processor)
    seqs = SequenceBatch(repeat_prompts(prompts, 2), torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3),
                         masked_pixel_values=repeat_prompts(prompts, 2).pixel_values.clone(),
                         prompt_group=torch.tensor([0, 0, 1, 1]))
    moved = seqs.to("meta")
    tensors = [moved.prompts.input_ids, moved.prompts.attention_mask, moved.prompts.pixel_values,
               moved.prompts.image_grid_thw, moved.response_ids, moved.response_mask, moved.masked_pixel_values]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.prompt_group.device.type == "cpu"  # Python-side bookkeeping stays on the host
    assert moved.prompts.images is seqs.prompts.images and moved.prompts.images_per_prompt == [1, 1, 1, 1]
    assert [t.shape for t in tensors] == [t.shape for t in (seqs.prompts.input_ids, seqs.prompts.attention_mask,
                                                            seqs.prompts.pixel_values, seqs.prompts.image_grid_thw,
                                                            seqs.response_ids, seqs.response_mask,
                                                            seqs.masked_pixel_values)]


@pytest.mark.slow
def test_gpu_step_benchmark_runs_at_tiny_shapes(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_step.py", "--smoke", "--rounds", "2", "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list(tmp_path.glob("gpu_step_*_smoke.json"))
    report = json.loads(path.read_text())
    assert not report["errors"]
    steps = report["steps"]
    assert set(steps["modes"]) == {"grpo", "papo_official", "papo"}
    assert all(m["steps_measured"] == 1 and m["step_s"] > m["train_side_s"] > 0 for m in steps["modes"].values())
    [grpo], [papo] = steps["rows"]["grpo"], steps["rows"]["papo"]
    assert steps["papo_over_grpo_step"] == pytest.approx(papo["step_s"] / grpo["step_s"])
    updates = report["memory"]["updates"]
    assert [(u["micro_batch"], u["fused_head"]) for u in updates] == [(2, True), (2, False), (4, True), (4, False)]
    assert report["memory"]["largest_micro_batch"] == {"fused": {"ran": 4}, "eager": {"ran": 4}}
    assert "| papo_official |" in path.with_suffix(".md").read_text()
