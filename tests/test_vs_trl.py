"""benchmarks/vs_trl.py end to end on OUR side only (no TRL needed): the shared checkpoint is built, a run of
ours_papo takes its 2 smoke steps with fixed-length responses, and the JSON, table and chart are written. Where trl
is installed (`.venv-trl`), a TRL run's per-phase profile is checked too."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from trl_runner import PHASES, PhaseClock  # noqa: E402


def check_phases(phases: dict, step_s: float) -> None:
    """The mapped phases exist, are non-negative, and the four measured ones sum to at most the step."""
    assert set(phases) == set(PHASES)
    measured = [phases[p] for p in PHASES if p != "other"]
    assert all(v >= 0 for v in measured), phases
    assert sum(measured) <= step_s + 1e-9 and phases["other"] >= -1e-9, (phases, step_s)
    assert phases["rollout"] > 0 and phases["update"] > 0


@pytest.mark.slow
def test_vs_trl_smoke_ours_only(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--smoke", "--modes", "ours_papo",
                           "--python", sys.executable, "--output", str(tmp_path)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [report_path] = tmp_path.glob("vs_trl_*.json")
    report = json.loads(report_path.read_text())
    mode = report["configurations"]["1x2x4"]["modes"]["ours_papo"]
    assert mode["runs"] == 1 and mode["fixed_length"] and mode["completion_tokens_per_s"]["median"] > 0
    check_phases(mode["phases_s"], mode["step_s"]["median"])  # one measured step: medians are that step's
    detail = mode["detail_s"]
    assert 0 < detail["generate"] <= mode["phases_s"]["rollout"]
    assert all(detail[f"update.{k}"] > 0 for k in ("forward", "backward", "optimizer"))
    assert report["summary"]["throughput_ratio_vs_trl"] is None  # no TRL mode ran
    runs = {r["config"]: r for r in report["runs"]}  # the smoke runs 1x2x4 at every default model shape
    assert set(runs) == {"1x2x4", "1x2x4@tiny-h128-l4", "1x2x4@tiny-vocab152k"}
    assert all(len(r["step_seconds"]) == 2 for r in runs.values())
    real_vocab = report["configurations"]["1x2x4@tiny-vocab152k"]
    assert real_vocab["shape_overrides"] == ["model.architecture=tiny-vocab152k"]
    assert real_vocab["modes"]["ours_papo"]["fixed_length"]
    assert report_path.with_suffix(".md").is_file() and report_path.with_suffix(".png").stat().st_size > 1000
    assert "| ours_papo |" in report_path.with_suffix(".md").read_text().split("Step by phase")[1]


def test_phase_clock_wraps_only_the_instance_and_conditions():
    class Box:
        def work(self, x):
            return x + 1

    a, b, gate = Box(), Box(), [False]
    clock = PhaseClock()
    clock.wrap(a, "work", "w", when=lambda: gate[0])
    assert a.work(1) == 2 and clock.take() == {}  # condition false: not timed
    gate[0] = True
    assert a.work(1) == 2 and b.work(1) == 2
    seams = clock.take()
    assert list(seams) == ["w"] and seams["w"] >= 0 and clock.calls == 1 and clock.take() == {}
    assert "work" not in vars(b)  # other instances keep the class's method


@pytest.mark.slow
def test_trl_run_phases(tmp_path):
    """A real TRL PAPOTrainer run (2 steps, 1×2×4) through the runner: every seam fires, phases sum to ≤ step."""
    pytest.importorskip("trl")
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_trl import run_env
    runner = str(ROOT / "benchmarks" / "trl_runner.py")
    model_dir, out = tmp_path / "ckpt", tmp_path / "run.json"
    for argv in (["--build-checkpoint", str(model_dir)],
                 ["--mode", "trl_papo", "--model-dir", str(model_dir), "--prompts", "1", "--n", "2", "--tokens", "4",
                  "--steps", "2", "--out", str(out)]):
        proc = subprocess.run([sys.executable, runner, *argv], capture_output=True, text=True, cwd=str(ROOT),
                              env=run_env("trl_papo", sys.executable), timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == 2
    for s in steps:
        check_phases(s["phases_s"], s["seconds"])
        d = s["detail_s"]
        assert 0 < d["generate"] <= d["rollout"] <= d["score"]
        assert s["phases_s"]["old_logprobs"] == 0  # num_iterations = 1, β = 0: TRL runs no no-grad pass
        assert abs(d["update.forward"] + d["update.backward"] + d["update.optimizer"] - s["phases_s"]["update"]) < 1e-9
