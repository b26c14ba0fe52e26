"""A real (tiny) PAPO run through the CLI, as a user starts it: artefacts on disk, loadable checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trainings in subprocesses
SMALL = ["trainer.steps=3", "warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=2",
         "trainer.micro_batch_size=4", "trainer.eval_samples=8", "rollout.max_new_tokens=8"]


def run_papo(tmp_path, *overrides, env_extra=None):
    env = dict(os.environ, WANDB_MODE="offline", **(env_extra or {}))
    cmd = [sys.executable, "-m", "papo_engine.cli", "train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           f"trainer.output_dir={tmp_path}", *SMALL, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_papo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_run_leaves_metrics_plot_wandb_and_checkpoint(finished_run):
    out, result = finished_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward", "accuracy", "perception_kl", "entropy", "masked_entropy", "clip_fraction",
                "response_length", "time/rollout", "time/old_logprobs", "time/update"):
        assert all(key in r for r in rows), key
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)
    # perception reliance: one KL_prcp value per sampled sequence (4 prompts x 2 responses)
    assert all(len(r["perception_reliance"]) == 8 and min(r["perception_reliance"]) >= 0 for r in rows)
    assert (out / "curves.png").stat().st_size > 10_000
    assert list((out / "wandb").glob("offline-run-*")), "no W&B offline run"
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert "PAPO" in result.stderr  # the progress bar


def test_checkpoint_loads_with_from_pretrained(finished_run):
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
    out, _ = finished_run
    path = out / "checkpoint-final"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (path / "preprocessor_config.json").is_file()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_training_changes_the_weights(finished_run, tiny):
    """The saved weights differ from the seed-0 initialization the run started from."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    out, _ = finished_run
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "checkpoint-final").state_dict()
    initial = tiny[3].state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(trained) // 2


def test_training_on_local_files(tmp_path):
    """The same loop on a local JSONL dataset (ViRL39K schema, images as relative paths), one record broken."""
    from papo_engine.data import GeneratedDataset
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        sample = GeneratedDataset("shape_count", "train", 8, 3, 56)[i]
        sample.image.save(data / f"{i}.png")
        rows.append({"id": f"r{i}", "problem": f"<image>{sample.question}", "answer": sample.answer,
                     "images": [f"{i}.png"]})
    rows.append({"id": "broken", "problem": "How many?", "answer": "2", "images": ["missing.png"]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_papo(tmp_path / "run", f"data.train_files=[{data / 'train.jsonl'}]",
                      f"data.eval_files=[{data / 'train.jsonl'}]", "warmup.steps=0", "trainer.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing_image_file" in result.stderr and "broken" in result.stderr  # counted, logged with its id
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval_accuracy"] <= 1.0 and "chance_accuracy" not in summary
