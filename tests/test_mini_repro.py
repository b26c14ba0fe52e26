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
    # speed beside GRPO, paired by seed, from the same runs; steps to reach 0.9 on hint-wrong items per seed
    for method in methods[1:]:
        ratio = report["summary"][method]["training_side_over_grpo"]["values"]
        assert len(ratio) == 1 and ratio[0] > 0
        assert len(report["summary"][method]["steps_to_reach_hint_wrong"]) == 1
    assert "step_over_grpo" not in report["summary"]["grpo"]


def test_steps_to_reach_and_step_seconds_read_the_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mini_repro import REACHED, step_seconds, steps_to_reach
    curve = [{"step": s, "hint_wrong": {"accuracy": a}} for s, a in ((0, 0.2), (50, REACHED - 0.01), (100, REACHED),
                                                                     (150, 0.5))]
    assert steps_to_reach({"curve": curve}) == 100 and steps_to_reach({"curve": curve[:2]}) is None
    train = [{"time/step": 9.0, "time/old_logprobs": 9.0, "time/update": 9.0}] * 10 + \
        [{"time/step": t, "time/old_logprobs": 0.5, "time/update": t / 2} for t in (1.0, 2.0, 4.0)]
    assert step_seconds({"train": train}) == {"step": 2.0, "training_side": 1.5}  # medians after the first 10 steps


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


def test_early_phase_counts_breaks_per_arm_and_carries_earlier_arms_forward(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from early_phase import BREAK_FORMAT, load_arms, summarize_arm, table

    def run(method, seed, formats, final_acc):
        return {"method": method, "seed": seed, "train": [{"step": s, "format": f} for s, f in enumerate(formats)],
                "curve": [{"step": 0, "hint_wrong": {"accuracy": 0.3}},
                          {"step": len(formats), "hint_wrong": {"accuracy": final_acc}}]}
    low, ok = BREAK_FORMAT - 0.01, BREAK_FORMAT  # a break is strictly below the threshold
    runs = [run("grpo", 1, [ok, low, low, ok], 0.5), run("grpo", 0, [ok, ok, ok, ok], 0.3),
            run("papo_g", 0, [0.0, ok, ok, ok], 0.4)]
    summary = summarize_arm(runs)
    assert summary["grpo"]["seeds"] == [0, 1] and summary["grpo"]["runs_with_a_break"] == 1
    assert summary["grpo"]["broken_steps"] == [0, 2] and summary["grpo"]["first_break_step"] == [None, 1]
    assert summary["grpo"]["lowest_format"] == low and summary["grpo"]["last_eval_step"] == 4
    assert summary["grpo"]["hint_wrong_acc_at_last_eval"]["mean"] == pytest.approx(0.4)
    assert summary["grpo"]["hint_wrong_acc_at_last_eval"]["std"] == pytest.approx(2 ** 0.5 * 0.1)
    assert summary["papo_g"]["first_break_step"] == [0] and summary["papo_g"]["lowest_format"] == 0.0
    # an arm from a mini_repro JSON, and one carried forward from an earlier early-phase JSON under its own name
    (tmp_path / "new.json").write_text(json.dumps({"command": "mini_repro.py x=1", "runs": runs}))
    (tmp_path / "old.json").write_text(json.dumps({"arms": {"base": runs[:1]}, "commands": {"base": "mini_repro.py"}}))
    arms, commands = load_arms([f"x={tmp_path / 'new.json'}", f"ignored={tmp_path / 'old.json'}"])
    assert sorted(arms) == ["base", "x"] and commands == {"x": "mini_repro.py x=1", "base": "mini_repro.py"}
    text = table({"question": "q", "device": "d", "date": "t", "commands": commands,
                  "summary": {name: summarize_arm(r) for name, r in arms.items()}})
    assert "| x | grpo | 1 / 2 | 2 (0, 2) | –, 1 |" in text
    with pytest.raises(SystemExit, match="expected NAME=FILE"):
        load_arms(["no_equals_sign"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither a mini_repro JSON"):
        load_arms([f"y={tmp_path / 'other.json'}"])


@pytest.mark.slow
def test_update_size_first_adam_step_scales_with_lr(tmp_path):
    """Adam's first step is lr * sign(gradient) per coordinate (the same gradient for both arms: same seed, same
    warm-start, same rollout), so halving the lr halves the whole model's relative change."""
    tiny = "trainer.prompts_per_step=2 rollout.max_new_tokens=6 warmup.steps=2"
    cmd = [sys.executable, "benchmarks/update_size.py", "--seeds", "0", "--steps", "1", "--out", str(tmp_path),
           "--arm", f"full={tiny} optim.lr=0.001", "--arm", f"half={tiny} optim.lr=0.0005"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list(tmp_path.glob("mini_repro_update_size_*.json"))
    arms = json.loads(path.read_text())["arms"]
    [full], [half] = arms["full"]["0"], arms["half"]["0"]
    assert full["lr"] == pytest.approx(2 * half["lr"]) and full["grad_norm"] == pytest.approx(half["grad_norm"])
    assert full["relative_change"] / half["relative_change"] == pytest.approx(2.0, rel=0.02)
    assert 0 <= full["tiny_gradient_coords_moved_over_half_lr"] <= 1 and len(full["largest_tensor_changes"]) == 5
    assert "| half | 0 | 0 |" in path.with_suffix(".md").read_text()


def test_merge_joins_a_study_run_in_parts_and_refuses_what_differs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mini_repro import BREAK_FORMAT, METHODS, SETTINGS, merge, run_overrides

    def run(method, seed, accuracy, formats=(1.0, 1.0), extra=("optim.lr=0.0005",)):
        final = {s: {"accuracy": accuracy, "hint_follow": 0.0, "reliance_mean": 0.1} for s in ("hint_right", "hint_wrong")}
        return {"method": method, "seed": seed, "overrides": run_overrides(method, seed, f"/tmp/{method}{seed}", extra=extra),
                "warm_start_checksum": f"w{seed}", "curve": [{"step": 0, **final}], "final": final,
                "train": [{"step": i, "reward": accuracy, "format": f} for i, f in enumerate(formats)]}

    def report(runs):
        return {**{k: 1 for k in SETTINGS}, "platform": "p", "command": "c", "jobs": 2, "torch_threads": 1, "runs": runs}
    part_a = report([run("grpo", 0, 1.0), run("papo_g", 0, 0.5), run("grpo", 1, 0.5, (1.0, BREAK_FORMAT - 0.1))])
    part_b = report([run("papo_g_authors", 1, 0.25), run("papo_g_authors", 0, 0.75)])
    merged = merge([("a.json", part_a), ("b.json", part_b)])
    assert merged["methods"] == ["grpo", "papo_g", "papo_g_authors"] and merged["seeds"] == [0, 1]
    assert [(r["method"], r["seed"]) for r in merged["runs"]] == [
        ("grpo", 0), ("papo_g", 0), ("papo_g_authors", 0), ("grpo", 1), ("papo_g_authors", 1)]
    summary = merged["summary"]
    assert summary["grpo"]["hint_wrong"]["accuracy"]["mean"] == pytest.approx(0.75)
    assert summary["papo_g_authors"]["hint_wrong"]["accuracy"]["values"] == [0.75, 0.25]
    assert summary["grpo"]["broken_format_batches"] == [0, 1] and summary["same_warm_start_per_seed"] is True
    assert [m["file"] for m in merged["merged_from"]] == ["a.json", "b.json"]
    assert set(METHODS) >= set(merged["methods"])
    with pytest.raises(ValueError, match=r"b.json: papo_g_authors seed 1 is in b.json too"):
        merge([("a.json", part_a), ("b.json", report(part_b["runs"] * 2))])
    with pytest.raises(ValueError, match=r"c.json: grpo seed 2 ran with no more and without \['optim.lr=0.0005'\]"):
        merge([("a.json", part_a), ("c.json", report([run("grpo", 2, 1.0, extra=())]))])
    with pytest.raises(ValueError, match=r"d.json: steps = 2, but a.json has 1"):
        merge([("a.json", part_a), ("d.json", {**report([]), "steps": 2})])
