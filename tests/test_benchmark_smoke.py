"""The benchmark scripts end to end at tiny sizes (their numbers are not checked, only that every path runs and
writes what its readers need): the rollout comparison, the PAPO/GRPO throughput at Qwen's real vocabulary, and
the memory-scaling sweep (our two heads; TRL's side needs .venv-trl)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *argv: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_rollout_benchmark_native_and_hf(tmp_path):
    run("rollout.py", "--backends", "native", "hf", "--prompts", "2", "--n", "2", "--max-new-tokens", "4",
        "--rounds", "2", "--output", str(tmp_path))
    [path] = tmp_path.glob("rollout_*.json")
    summary = json.loads(path.read_text())["summary"]
    assert summary["native_over_hf_rollout_tokens_per_s"] > 0 and summary["native_tokens_identical_to_hf"]
    assert "native (ours)" in path.with_suffix(".md").read_text()


def test_throughput_at_the_real_vocabulary(tmp_path):
    run("throughput.py", "--shape", "tiny-vocab152k", "--steps", "2", "--repeats", "1", "--output", str(tmp_path),
        "trainer.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4")
    [path] = tmp_path.glob("throughput_*_tiny-vocab152k.json")
    report = json.loads(path.read_text())
    assert report["shape_overrides"][0] == "model.architecture=tiny-vocab152k"
    assert set(report["summary"]) == {"papo_official_over_grpo_step_time", "papo_over_grpo_step_time",
                                      "papo_official_over_grpo_training_side", "papo_over_grpo_training_side",
                                      "padding_fraction", "row_utilization"}
    assert len(report["per_step_ratios"]["papo"]) == 1


# paper-mini's long-tailed lengths on a smaller model: every path of its runs, the code before the length-aware
# round included (benchmarks/before.py: a worker on that commit's files)
SMALL_PAPER = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
               "model.intermediate_size=64", "data.image_size=56"]


def test_paper_mini_throughput_and_rollout_beside_the_code_before(tmp_path):
    run("throughput.py", "--shape", "paper-mini", "--steps", "2", "--repeats", "1", "--output", str(tmp_path),
        *SMALL_PAPER, "trainer.prompts_per_step=2", "rollout.max_new_tokens=12")
    [path] = tmp_path.glob("throughput_*_paper-mini.json")
    report = json.loads(path.read_text())
    assert report["imposed_lengths"]["median"] == 64 and "papo_before" in report["modes"]
    assert report["summary"]["speedup_over_before"] > 0 and 0 <= report["summary"]["padding_fraction"] < 1
    run("rollout.py", "--shape", "paper-mini", "--backends", "native", "native_before", "hf", "--prompts", "2",
        "--max-new-tokens", "100", "--rounds", "2", "--output", str(tmp_path), *SMALL_PAPER)
    report = json.loads(next(tmp_path.glob("rollout_*_paper-mini.json")).read_text())
    lengths = report["imposed_lengths"]["per_response"]
    assert len(lengths) == 10 and max(lengths) <= 100 and len(set(lengths)) > 2  # uneven, at most the cap
    assert report["summary"]["native_tokens_identical_to_hf"] and report["summary"]["native_before_tokens_identical_to_hf"]
    assert all(run["tokens"] == sum(lengths) for runs in report["runs"].values() for run in runs)


def test_memory_scaling_ours_fused_and_eager(tmp_path):
    run("memory_scaling.py", "--lengths", "2", "4", "--sequences", "2", "--systems", "ours_fused", "ours_eager",
        "--python", sys.executable, "--output", str(tmp_path))
    [path] = tmp_path.glob("memory_scaling_*.json")
    report = json.loads(path.read_text())
    for system in ("ours_fused", "ours_eager"):
        r = report["systems"][system]
        assert [p["status"] for p in r["points"]] == ["ok", "ok"] and r["longest_that_ran"] == 4
        assert all(p["completion_tokens"] == 2 * p["length"] for p in r["points"])  # fixed-length responses
    assert path.with_suffix(".png").stat().st_size > 1000 and "ours_eager" in path.with_suffix(".md").read_text()
