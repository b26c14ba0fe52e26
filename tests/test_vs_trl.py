"""benchmarks/vs_trl.py end to end on OUR side only (no TRL needed): the shared checkpoint is built, a run of
ours_papo takes its 2 smoke steps with fixed-length responses, and the JSON, table and chart are written."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vs_trl_smoke_ours_only(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--smoke", "--modes", "ours_papo",
                           "--python", sys.executable, "--output", str(tmp_path)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [report_path] = tmp_path.glob("vs_trl_*.json")
    report = json.loads(report_path.read_text())
    mode = report["configurations"]["1x2x4"]["modes"]["ours_papo"]
    assert mode["runs"] == 1 and mode["fixed_length"] and mode["completion_tokens_per_s"]["median"] > 0
    assert set(mode["phases_s"]) >= {"rollout", "update"}
    assert report["summary"]["throughput_ratio_vs_trl"] is None  # no TRL mode ran
    [run] = report["runs"]
    assert len(run["step_seconds"]) == 2
    assert report_path.with_suffix(".md").is_file() and report_path.with_suffix(".png").stat().st_size > 1000
