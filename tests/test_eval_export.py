"""`papo export` (1-process and 2-process ZeRO-3 checkpoints) gives the trainer's model, and `papo eval` reports
what a direct greedy computation gives."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts, mm_token_type_ids
from papo_engine.prompts import VISION_TOKENS
from papo_engine.rewards import accuracy_format_reward

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trainer.steps=2", "trainer.save_every=2", "warmup.steps=20", "trainer.prompts_per_step=4", "rollout.n=2",
         "trainer.micro_batch_size=4", "trainer.eval_samples=4", "rollout.max_new_tokens=8", "logging.wandb=false",
         "logging.plot=false"]


def _papo(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    _papo("train", f"trainer.output_dir={out}", *SMALL)
    return out


def assert_same_logits(dir_a: Path, dir_b: Path, tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tokenizer, processor, _ = tiny
    samples = [GeneratedDataset("shape_color", "eval", 3, 0, 56)[i] for i in range(3)]
    pb = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    logits = []
    for path in (dir_a, dir_b):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
        with torch.no_grad():
            logits.append(model(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                                pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw,
                                mm_token_type_ids=mm_token_type_ids(pb.input_ids, model.config.image_token_id)).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-6


@pytest.mark.slow
def test_export_equals_the_trainers_model(trained, tmp_path, tiny):
    _papo("export", str(trained / "checkpoints" / "step-000002"), str(tmp_path / "hf"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    assert_same_logits(tmp_path / "hf", trained / "checkpoint-final", tiny)


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", "export", str(tmp_path), str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "not a complete training checkpoint" in result.stderr


def _benchmark_file(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(GeneratedDataset("shape_color", "eval", count, 7, 56)[j] for j in range(count)):
        sample.image.save(folder / f"{i}.png")
        rows.append({"id": f"q{i}", "problem": f"<image>{sample.question}", "answer": sample.answer,
                     "images": [f"{i}.png"]})
    path = folder / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_eval_matches_a_direct_greedy_computation(trained, tmp_path, tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tokenizer, processor, _ = tiny
    bench = _benchmark_file(tmp_path / "bench", 12)
    model_dir = trained / "checkpoint-final"
    report_file = tmp_path / "eval.json"
    result = _papo("eval", "--model", str(model_dir), "--data", str(bench), "--k", "2", "--temperature", "0",
                   "--output", str(report_file), "rollout.max_new_tokens=8")
    report = json.loads(report_file.read_text())
    row = report["benchmarks"]["colors"]
    assert row["questions"] == 12 and sum(row["skipped"].values()) == 0
    assert "colors" in result.stdout and "avg@2" in result.stdout
    # direct: one question at a time, no padding, greedy, graded by the reward's accuracy
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    correct = []
    for i, line in enumerate(bench.read_text().splitlines()):
        record = json.loads(line)
        image = Image.open(bench.parent / record["images"][0]).convert("RGB")
        pb = encode_prompts([record["problem"].replace("<image>", "")], [[image]], tokenizer, processor)
        with torch.no_grad():
            out = model.generate(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                                 pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw,
                                 mm_token_type_ids=mm_token_type_ids(pb.input_ids, model.config.image_token_id),
                                 do_sample=False, max_new_tokens=8, suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, pb.input_ids.shape[1]:], skip_special_tokens=True)
        correct.append(accuracy_format_reward(text, record["answer"])["accuracy"])
    assert row["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-9)


def _one_line_error(*args):
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("papo:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_eval_of_a_folder_without_weights_is_one_line(trained, tmp_path):
    bench = _benchmark_file(tmp_path / "bench", 1)
    config_only = trained / "checkpoints" / "step-000002" / "hf"  # config + tokenizer, no weights
    line = _one_line_error("eval", "--model", str(config_only), "--data", str(bench))
    assert f"--model {config_only}: no model weights in it" in line
    checkpoint = trained / "checkpoints" / "step-000002"
    line = _one_line_error("eval", "--model", str(checkpoint), "--data", str(bench))
    assert "is a training checkpoint" in line and f"papo export {checkpoint}" in line


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint_or_onto_a_file_is_one_line(trained, tmp_path):
    import shutil
    damaged = shutil.copytree(trained / "checkpoints" / "step-000002", tmp_path / "step-000002")
    target = tmp_path / "a_file"
    target.write_text("x")
    assert f"{target} is a file" in _one_line_error("export", str(damaged), str(target))
    model_states = next((damaged / "deepspeed").rglob("*model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:4096])
    line = _one_line_error("export", str(damaged), str(tmp_path / "out"))
    assert f"{model_states}: unreadable" in line
    assert not (tmp_path / "out").exists()
