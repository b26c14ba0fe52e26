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


@pytest.mark.slow
def test_the_computation_study_command_at_tiny_sizes(tmp_path):
    """Every method of the study, 2 of 6 scheduled steps (--stop-after): each run trains with its own overrides, on
    the full run's lr schedule, and the summary counts collapsed and runaway seeds per method."""
    from papo_engine.config import load_config
    from papo_engine.trainer import learning_rate
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mini_repro import METHODS
    methods = list(METHODS)
    cmd = [sys.executable, "benchmarks/mini_repro.py", "--steps", "6", "--stop-after", "2", "--seeds", "0",
           "--methods", *methods, "--jobs", "2", "--prompts", "2", "--eval-samples", "2", "--eval-every", "1",
           "--warmup-steps", "1", "--out", str(tmp_path), "rollout.max_new_tokens=6", "optim.warmup_steps=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list(tmp_path.glob("mini_repro_*.json"))
    report = json.loads(path.read_text())
    assert report["methods"] == methods and report["stop_after"] == 2
    optim = load_config(None, ["optim.warmup_steps=3"]).optim
    for run in report["runs"]:
        assert all(o in run["overrides"] for o in METHODS[run["method"]])
        assert [row["step"] for row in run["train"]] == [0, 1] and [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert [row["lr"] for row in run["train"]] == pytest.approx([learning_rate(s, 6, optim) for s in (0, 1)])
        assert ("perception_kl" in run["train"][0]) == (run["method"] != "grpo")
    for method in methods:
        assert isinstance(report["summary"][method]["collapsed_seeds"], list)
        assert isinstance(report["summary"][method]["kl_runaway_seeds"], list)
    assert "| papo_g_presets_eta |" in path.with_suffix(".md").read_text()


def test_collapse_and_runaway_read_the_curve_after_the_stated_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mini_repro import COLLAPSE_AFTER, RUNAWAY_NATS, collapsed, kl_ran_away

    def point(step, acc, reliance=0.1):
        return {"step": step, **{s: {"accuracy": acc, "reliance_mean": reliance} for s in ("hint_right", "hint_wrong")}}
    early_dip = {"curve": [point(0, 0.3), point(COLLAPSE_AFTER, 0.0), point(COLLAPSE_AFTER + 50, 0.9)]}
    late_dip = {"curve": [point(0, 0.3), point(COLLAPSE_AFTER + 50, 0.25)]}
    hint_copier = {"curve": [point(0, 0.3), point(COLLAPSE_AFTER + 50, 1.0)]}
    hint_copier["curve"][-1]["hint_wrong"]["accuracy"] = 0.0
    assert not collapsed(early_dip) and collapsed(late_dip) and not collapsed(hint_copier)
    assert kl_ran_away({"curve": [point(0, 0.3), point(50, 0.9, RUNAWAY_NATS + 0.1)]})
    assert not kl_ran_away({"curve": [point(0, 0.3), point(50, 0.9, RUNAWAY_NATS)]})
