"""Bad input in only one rank's share, two ranks (torchrun, gloo) with DAPO dynamic sampling on: the ranks stay
in step. A corrupt image and an over-long prompt are dropped at load, where every rank reads every file, so the
counts (in summary.json) are global and every rank's batch stays full; a non-finite reward on rank 1 only stops
BOTH ranks at the same point with one line naming the rank and the reward function, exit 2 (before: rank 1
exited alone and rank 0 died in its next collective with a traceback)."""
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from papo_engine.distributed import free_port
from tests.test_resume import ROOT, _papo_lines
from tests.two_ranks import run_two_ranks

RUN = ["logging.wandb=false", "logging.plot=false", "data.eval_size=4", "trainer.eval_samples=2",
       "rollout.max_new_tokens=4", "warmup.steps=0", "trainer.steps=2", "trainer.save_every=0",
       "trainer.save_final=false", "trainer.prompts_per_step=4", "rollout.n=2", "trainer.micro_batch_size=4",
       "algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=2"]


def _two_ranks(out, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "papo_engine.cli", "train", f"trainer.output_dir={out}", *RUN, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"),
                          timeout=600)


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_corrupt_image_and_long_prompt_in_one_ranks_share(tmp_path):
    """A truncated image file and a prompt over data.max_prompt_length among 10 records: both ranks drop them at
    load (whichever rank's share they would have fallen in), the run finishes, summary.json counts them once."""
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    records = []
    for i in range(8):
        name = list(colors)[i % 3]
        (tmp_path / f"{i}.png").write_bytes(_png(colors[name]))
        records.append({"problem": "What colour is the shape?", "answer": name, "images": [f"{i}.png"]})
    (tmp_path / "broken.png").write_bytes(_png((1, 2, 3))[:60])  # truncated: does not decode
    records.insert(5, {"problem": "What colour is the shape?", "answer": "red", "images": ["broken.png"]})
    records.insert(6, {"problem": "What colour is the shape? " + "Look closely. " * 200, "answer": "red",
                       "images": ["0.png"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _two_ranks(tmp_path / "run", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
                        "data.max_prompt_length=200")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_train"] == {"loaded": 8, "skipped": {"corrupt_image": 1, "prompt_too_long": 1}}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(1 <= r["dynamic_sampling/rounds"] <= 2 for r in rows)


@pytest.mark.slow
def test_nonfinite_reward_on_one_rank_stops_both_together(tmp_path):
    result = _two_ranks(tmp_path, "data.train_size=16",
                        "reward.function=tests.multiproc.rank1_nan_reward.rank1_nan_reward")
    assert "exitcode  : 2" in result.stderr and "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    lines = _papo_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("papo: error: rank 1 of 2: reward.function='tests.multiproc.rank1_nan_reward.")
    assert "reward=nan" in lines[0]


@pytest.mark.slow
def test_nonfinite_reward_on_one_rank_in_the_held_out_evaluation_stops_both(tmp_path):
    """The held-out evaluation's scoring (issue 43): both ranks raise the same one line (before: rank 1 raised
    alone and rank 0 waited in its next collective)."""
    errors = run_two_ranks("held_out_nan_reward.py", tmp_path, timeout=300)["errors"]
    assert errors[0] == errors[1] and errors[0].startswith("rank 1 of 2: reward.function='papo_engine.rewards."
                                                           "accuracy_format_reward' returned reward=nan"), errors
