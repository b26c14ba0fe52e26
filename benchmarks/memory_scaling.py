"""Peak memory of one PAPO step against the response length, at Qwen's real vocabulary: ours with the fused head,
ours with eager logits (`kernels.fused_head=false`), and TRL's PAPOTrainer.

    bash benchmarks/setup_trl_env.sh && .venv-trl/bin/python benchmarks/memory_scaling.py
    .venv-trl/bin/python benchmarks/memory_scaling.py --lengths 8 16 --systems ours_fused --output /tmp/m   # smoke

The checkpoint is the tiny body with the 151,936-token vocabulary (`model.architecture=tiny-vocab152k`, shared by
both systems as in benchmarks/vs_trl.py). Each point is one process (`trl_runner.py`: 1 prompt × 8 responses of
exactly L tokens, one PAPO step, fp32, gradient checkpointing off) run under an address-space limit
(RLIMIT_AS = --limit-gb) so that running out of memory ends that process, not the machine; a system's lengths
stop at its first out-of-memory point, which is recorded as a result ("out of memory at L"). Peak memory is the
process's peak resident set (ru_maxrss, from the OS). The slope is the least-squares growth of the peak in MB per
1,000 response tokens over the points that ran. Writes <output>/memory_scaling_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_device import device_name  # noqa: E402
from vs_trl import run_env  # noqa: E402

SYSTEMS = {  # name -> (trl_runner mode, extra overrides for our side)
    "ours_fused": ("ours_papo", []),
    "ours_eager": ("ours_papo", ["kernels.fused_head=false"]),
    "trl_papo": ("trl_papo", []),
}
OOM_SIGNS = ("can't allocate memory", "out of memory", "MemoryError", "Cannot allocate memory", "std::bad_alloc")


def run_point(python: str, model_dir: str, system: str, length: int, sequences: int, limit_bytes: int,
              work: Path) -> dict:
    mode, ours = SYSTEMS[system]
    out = work / f"{system}_{length}.json"
    argv = [python, str(ROOT / "benchmarks" / "trl_runner.py"), "--mode", mode, "--model-dir", model_dir,
            "--prompts", "1", "--n", str(sequences), "--tokens", str(length), "--steps", "1", "--out", str(out)]
    if ours:
        argv += ["--ours", *ours]

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    proc = subprocess.run(argv, env=run_env(mode, python), capture_output=True, text=True, cwd=str(ROOT),
                          preexec_fn=limit)
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        run = json.loads(out.read_text())
        return {"length": length, "status": "ok", "peak_rss_mb": run["peak_rss_mb"],
                "step_s": run["steps"][0]["seconds"],
                "completion_tokens": run["steps"][0]["completion_tokens"]}
    if proc.returncode < 0 or any(sign in text for sign in OOM_SIGNS):
        return {"length": length, "status": "out of memory", "returncode": proc.returncode}
    raise RuntimeError(f"{system} at length {length} failed (exit {proc.returncode}):\n" + "\n".join(
        text.strip().splitlines()[-20:]))


def slope(points: list[dict]) -> float | None:
    """Least-squares MB per 1,000 tokens over the points that ran (None with fewer than two)."""
    ok = [(p["length"], p["peak_rss_mb"]) for p in points if p["status"] == "ok"]
    if len(ok) < 2:
        return None
    mx = sum(x for x, _ in ok) / len(ok)
    my = sum(y for _, y in ok) / len(ok)
    return 1000 * sum((x - mx) * (y - my) for x, y in ok) / sum((x - mx) ** 2 for x, _ in ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 1920])
    parser.add_argument("--sequences", type=int, default=8, help="responses in the step (1 prompt x this)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit per point (GiB)")
    parser.add_argument("--python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    limit = int(args.limit_gb * 2**30)
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory_scaling_") as tmp:
        model_dir = str(Path(tmp) / "checkpoint")
        subprocess.run([args.python, str(ROOT / "benchmarks" / "trl_runner.py"), "--build-checkpoint", model_dir,
                        "--shape", "tiny-vocab152k"], env=run_env("", args.python), check=True, cwd=str(ROOT))
        for system in args.systems:
            points = []
            for length in sorted(args.lengths):
                point = run_point(args.python, model_dir, system, length, args.sequences, limit, Path(tmp))
                points.append(point)
                print(f"{system} L={length}: " + (f"peak RSS {point['peak_rss_mb']:.0f} MB, step "
                      f"{point['step_s']:.1f} s" if point["status"] == "ok" else point["status"]), flush=True)
                if point["status"] != "ok":
                    break
            ran = [p["length"] for p in points if p["status"] == "ok"]
            oom = next((p["length"] for p in points if p["status"] != "ok"), None)
            results[system] = {"points": points, "longest_that_ran": max(ran) if ran else None,
                               "out_of_memory_at": oom, "slope_mb_per_1k_tokens": slope(points)}
    summary = {f"{s}_longest_that_ran": r["longest_that_ran"] for s, r in results.items()}
    summary.update({f"{s}_slope_mb_per_1k_tokens": r["slope_mb_per_1k_tokens"] for s, r in results.items()})
    fused, eager = results.get("ours_fused"), results.get("ours_eager")
    if fused and eager and fused["slope_mb_per_1k_tokens"] and eager["slope_mb_per_1k_tokens"]:
        summary["fused_over_eager_slope"] = fused["slope_mb_per_1k_tokens"] / eager["slope_mb_per_1k_tokens"]
    report = {"device": device_name(), "platform": platform.platform(), "vocab_size": 151936,
              "sequences": args.sequences, "limit_gib": args.limit_gb, "lengths": sorted(args.lengths),
              "systems": results, "summary": summary}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"memory_scaling_{report['device']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table(report))
    chart(report, stem.with_suffix(".png"))
    print(table(report))
    return 0


def table(report: dict) -> str:
    lengths = report["lengths"]
    lines = [f"# Peak memory of one PAPO step vs response length on {report['device']} (1 prompt x "
             f"{report['sequences']} responses, vocabulary {report['vocab_size']:,}, fp32, address space limited to "
             f"{report['limit_gib']:g} GiB per run)", "",
             "| system | " + " | ".join(f"L = {n}" for n in lengths) + " | MB per 1k tokens |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for system, r in report["systems"].items():
        by_length = {p["length"]: p for p in r["points"]}
        cells = []
        for n in lengths:
            p = by_length.get(n)
            cells.append("—" if p is None else (f"{p['peak_rss_mb']:.0f} MB" if p["status"] == "ok" else "out of memory"))
        s = r["slope_mb_per_1k_tokens"]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {'n/a' if s is None else f'{s:.0f}'} |")
    sm = report["summary"]
    if "fused_over_eager_slope" in sm:
        lines += ["", f"fused ÷ eager slope: **{sm['fused_over_eager_slope']:.3f}**"]
    return "\n".join(lines + [""])


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for system, r in report["systems"].items():
        ok = [p for p in r["points"] if p["status"] == "ok"]
        line, = ax.plot([p["length"] for p in ok], [p["peak_rss_mb"] / 1024 for p in ok], marker="o", label=system)
        if r["out_of_memory_at"]:
            ax.axvline(r["out_of_memory_at"], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(report["limit_gib"], color="grey", linestyle="--", linewidth=0.8, label="limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("response length (tokens), dotted: first out-of-memory length")
    ax.set_ylabel("peak RSS of one PAPO step (GiB)")
    ax.set_title(f"PAPO step memory, vocabulary {report['vocab_size']:,}, {report['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
