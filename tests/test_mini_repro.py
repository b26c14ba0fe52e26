"""The miniature reproduction end to end (2 steps, 1 seed, 4 prompts), and the hinted task it trains on."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from papo_engine.data import COLORS, make_sample
from papo_engine.hint_task import HintDataset, make_hint_sample

ROOT = Path(__file__).resolve().parents[1]


def test_hint_is_right_with_probability_rho_and_the_image_is_shape_colors():
    data = HintDataset("train", 2000, 0, 56, 0.7)
    right = [data[i].hint == data[i].answer for i in range(len(data))]
    assert abs(sum(right) / len(right) - 0.7) < 0.03
    for i in range(20):
        sample, base = data[i], make_sample("shape_color", i, "train", 0, 56)
        assert sample.answer == base.answer and sample.image.tobytes() == base.image.tobytes()
        assert sample.question == f"{base.question} Hint: the answer is {sample.hint}." and sample.hint in COLORS
    assert all(make_hint_sample(i, "eval", 0, 56, 0.7, "right").hint == make_hint_sample(i, "eval", 0, 56, 0.7).answer
               for i in range(50))
    assert all(make_hint_sample(i, "eval", 0, 56, 0.7, "wrong").hint != make_hint_sample(i, "eval", 0, 56, 0.7).answer
               for i in range(50))
    assert make_hint_sample(3, "train", 0, 56, 0.7).question == make_hint_sample(3, "train", 0, 56, 0.7).question
    with pytest.raises(ValueError, match="hint='maybe'"):
        make_hint_sample(0, "eval", 0, 56, 0.7, "maybe")


@pytest.mark.slow
def test_mini_repro_two_steps_end_to_end(tmp_path):
    cmd = [sys.executable, "benchmarks/mini_repro.py", "--steps", "2", "--seeds", "0", "--prompts", "4",
           "--eval-samples", "4", "--eval-every", "1", "--warmup-steps", "2", "--out", str(tmp_path),
           "rollout.max_new_tokens=8"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list(tmp_path.glob("mini_repro_*.json"))
    report = json.loads(path.read_text())
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 1000
    assert report["methods"] == ["grpo", "papo_g"] and report["steps"] == 2 and report["rho"] == 0.7
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("grpo", 0), ("papo_g", 0)]
    for run in report["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2] and len(run["train"]) == 2
        for split in ("hint_right", "hint_wrong"):
            final = run["final"][split]
            assert len(final["per_sample_reliance"]) == 4 and all(v >= -1e-6 for v in final["per_sample_reliance"])
            for point in run["curve"]:
                m = point[split]
                assert 0 <= m["accuracy"] <= 1 and 0 <= m["hint_follow"] <= 1 and m["reliance_mean"] >= -1e-6
        # GRPO trains without a masked branch; PAPO logs its training-time perception KL
        assert all(("perception_kl" in row) == (run["method"] == "papo_g") for row in run["train"])
    summary = report["summary"]
    assert summary["same_warm_start_per_seed"] is True
    for method in ("grpo", "papo_g"):
        for split in ("hint_right", "hint_wrong"):
            acc = summary[method][split]["accuracy"]
            assert set(acc) == {"mean", "std", "min", "max", "values"} and len(acc["values"]) == 1
            assert acc["std"] == 0.0 and acc["min"] <= acc["mean"] <= acc["max"]
    table = path.with_suffix(".md").read_text()
    assert "| papo_g | hint_wrong |" in table and "Same warm-start for both methods on every seed: True" in table
