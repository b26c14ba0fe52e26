"""paper-mini: the speed benchmarks at a real PAPO run's proportions (benchmarks/shapes.py), one command, one summary.

    python benchmarks/paper_mini.py                        # every part below, ~1.5 h on the 2-core CPU
    python benchmarks/paper_mini.py --only rollout tail     # some parts; the summary keeps the others' last results

Each part runs in its own process, one at a time (a timing needs the machine to itself), and writes its own results
under benchmarks/results/:
  rollout      rollout.py --shape S --backends native native_before hf vllm    (S = paper-mini, paper-mini-vocab152k)
  throughput   throughput.py --shape S, modes grpo, papo_official, papo, papo_fixed_micro_batches and papo_before
  trl          vs_trl.py --configs 8x5x256@paper-mini 4x5x128@paper-mini-vocab152k --suffix _paper-mini  (.venv-trl)
  tail         throughput.py --shape paper-mini --modes papo --sigma s for s in SIGMAS: PAPO's step now and before the
               length-aware round, against the tail of the response lengths
then paper_mini_<device>.{json,md,png}: the summary keys (suffix _paper_mini; _paper_mini_vocab152k for the
head-heavy variant), each with the file it was read from, and the plot of the step time against the tail.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_device import device_name, write_results  # noqa: E402
from shapes import PAPER_MINI  # noqa: E402
from throughput import sigma_suffix  # noqa: E402

PARTS = ("rollout", "throughput", "trl", "tail")
SIGMAS = (0.0, 0.4, 0.8, 1.2)
SUFFIX = {"paper-mini": "paper_mini", "paper-mini-vocab152k": "paper_mini_vocab152k"}
THROUGHPUT_MODES = ["grpo", "papo_official", "papo", "papo_fixed_micro_batches"]


def run(python: str, script: str, *argv: str) -> None:
    print(f"paper_mini: {script} {' '.join(argv)}", flush=True)
    start = time.time()
    subprocess.run([python, str(ROOT / "benchmarks" / script), *argv], cwd=str(ROOT), check=True)
    print(f"paper_mini: {script} done in {time.time() - start:.0f} s", flush=True)


def measure(parts: list[str], output: Path, trl_python: str) -> None:
    out = ["--output", str(output)]
    for shape in PAPER_MINI:
        if "rollout" in parts:
            run(sys.executable, "rollout.py", "--shape", shape, "--backends", "native", "native_before", "hf", "vllm",
                "--rounds", "4", *out)
        if "throughput" in parts:
            run(sys.executable, "throughput.py", "--shape", shape, "--modes", *THROUGHPUT_MODES, "--steps", "5",
                "--repeats", "2" if shape == "paper-mini" else "1", *out)
    if "trl" in parts:
        run(trl_python, "vs_trl.py", "--configs", "8x5x256@paper-mini", "4x5x128@paper-mini-vocab152k",
            "--shape-modes", "ours_grpo", "ours_papo", "trl_grpo", "trl_papo", "trl_papo_malloc",
            "--repeats", "2", "--steps", "5", "--drop", "2", "--python", trl_python, "--suffix", "_paper-mini", *out)
    if "tail" in parts:
        for sigma in SIGMAS:
            run(sys.executable, "throughput.py", "--shape", "paper-mini", "--modes", "papo", "--sigma", str(sigma),
                "--steps", "4", "--repeats", "1", *out)


def read(output: Path, stem: str) -> dict | None:
    path = output / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(output: Path) -> dict:
    device = device_name()
    summary, sources, details = {}, {}, {}

    def put(key: str, value, source: str) -> None:
        if value is not None:
            summary[key], sources[key] = value, source

    for shape in PAPER_MINI:
        sfx = SUFFIX[shape]
        rollout = read(output, f"rollout_{device}_{shape}")
        if rollout:
            s, name = rollout["summary"], f"rollout_{device}_{shape}.json"
            put(f"native_over_vllm_rollout_tokens_per_s_{sfx}", s.get("native_over_vllm_rollout_tokens_per_s"), name)
            put(f"native_over_native_before_rollout_tokens_per_s_{sfx}",
                s.get("native_over_native_before_rollout_tokens_per_s"), name)
            put(f"native_over_hf_rollout_tokens_per_s_{sfx}", s.get("native_over_hf_rollout_tokens_per_s"), name)
            # a static batch (HF generate, and the native decode before the round) computes every row to the end
            put(f"row_utilization_static_batch_{sfx}", s.get("hf_row_utilization"), name)
            details[f"rollout_{sfx}"] = {k: s[k] for k in s if k.endswith(("tokens_per_s", "utilization"))}
        throughput = read(output, f"throughput_{device}_{shape}")
        if throughput:
            s, name, modes = throughput["summary"], f"throughput_{device}_{shape}.json", throughput["modes"]
            put(f"speedup_over_before_{sfx}", s.get("speedup_over_before"), name)
            put(f"speedup_over_before_rollout_{sfx}", s.get("speedup_over_before_rollout"), name)
            put(f"speedup_over_before_training_side_{sfx}", s.get("speedup_over_before_training_side"), name)
            put(f"papo_official_over_grpo_step_time_{sfx}", s.get("papo_official_over_grpo_step_time"), name)
            put(f"papo_over_grpo_step_time_{sfx}", s.get("papo_over_grpo_step_time"), name)
            put(f"padding_fraction_{sfx}", s.get("padding_fraction"), name)
            put(f"row_utilization_{sfx}", s.get("row_utilization"), name)
            fixed = modes.get("papo_fixed_micro_batches", {})
            put(f"padding_fraction_fixed_micro_batches_{sfx}", fixed.get("update/padding_fraction"), name)
            details[f"throughput_{sfx}"] = {m: {"step_s": v["step_s"], "phases_s": v["phases_s"]}
                                            for m, v in modes.items()}
    trl = read(output, f"vs_trl_{device}_paper-mini")
    if trl:
        for shape in PAPER_MINI:
            sfx = SUFFIX[shape]
            put(f"throughput_ratio_vs_trl_{sfx}", trl["summary"].get(f"throughput_ratio_vs_trl_{sfx}"),
                f"vs_trl_{device}_paper-mini.json")
            put(f"peak_rss_ratio_vs_trl_{sfx}", trl["summary"].get(f"peak_rss_ratio_vs_trl_{sfx}"),
                f"vs_trl_{device}_paper-mini.json")
    tail = []
    for sigma in SIGMAS:
        sweep = read(output, f"throughput_{device}_paper-mini{sigma_suffix(sigma)}")
        if sweep:
            tail.append({"sigma": sigma, "papo_step_s": sweep["modes"]["papo"]["step_s"],
                         "papo_before_step_s": sweep["modes"]["papo_before"]["step_s"],
                         "speedup_over_before": sweep["summary"]["speedup_over_before"],
                         "padding_fraction": sweep["summary"].get("padding_fraction"),
                         "row_utilization": sweep["summary"].get("row_utilization")})
    return {"device": device, "summary": summary, "sources": sources, "details": details, "tail_sweep": tail}


def table(report: dict) -> str:
    s, sources = report["summary"], report["sources"]
    lines = [f"# paper-mini on {report['device']}: the speed benchmarks at a real run's proportions", "",
             "Shapes, lengths and how each number is measured: benchmarks/shapes.py, benchmarks/paper_mini.py. "
             "Ratios are medians of paired measurements (backends or modes taking turns).", "",
             "| measure | paper-mini (body 9 : head 1) | paper-mini-vocab152k (head-heavy) | from |", "|---|---|---|---|"]
    keys = sorted({k[:-len("_paper_mini")] for k in s if k.endswith("_paper_mini")} |
                  {k[:-len("_paper_mini_vocab152k")] for k in s if k.endswith("_paper_mini_vocab152k")})
    for key in keys:
        a, b = s.get(f"{key}_paper_mini"), s.get(f"{key}_paper_mini_vocab152k")
        source = sources.get(f"{key}_paper_mini") or sources.get(f"{key}_paper_mini_vocab152k")
        lines.append(f"| {key} | {'' if a is None else f'{a:.3f}'} | {'' if b is None else f'{b:.3f}'} | {source} |")
    if report["tail_sweep"]:
        lines += ["", "Step time against the tail of the response lengths (paper-mini, log-normal median 64, cap 256):",
                  "", "| sigma | PAPO step now (s) | before (s) | before / now (paired) | padding | row utilization |",
                  "|---|---|---|---|---|---|"]
        for t in report["tail_sweep"]:
            lines.append(f"| {t['sigma']} | {t['papo_step_s']:.3f} | {t['papo_before_step_s']:.3f} | "
                         f"{t['speedup_over_before']:.2f}x | {t['padding_fraction']:.3f} | {t['row_utilization']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tail = report["tail_sweep"]
    if not tail:
        return
    sigma = [t["sigma"] for t in tail]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(sigma, [t["papo_before_step_s"] for t in tail], "o-", color="tab:orange",
            label="before: fixed micro-batches, static-batch decode")
    ax.plot(sigma, [t["papo_step_s"] for t in tail], "o-", color="tab:blue",
            label="now: length-aware micro-batches, rows leave the decode")
    for t in tail:
        ax.annotate(f"{t['speedup_over_before']:.2f}x", (t["sigma"], t["papo_step_s"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xlabel("sigma of the log-normal response lengths (median 64, cap 256): the tail")
    ax.set_ylabel("PAPO step (s, median)")
    ax.set_title(f"paper-mini on {report['device']}: step time against the length tail", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from the results there")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    output = Path(args.output)
    if not args.summary_only:
        if "trl" in args.only and not os.path.exists(args.trl_python):
            parser.error(f"{args.trl_python} not found: build it with `bash benchmarks/setup_trl_env.sh`")
        measure(args.only, output, args.trl_python)
    report = summarize(output)
    stem = output / f"paper_mini_{report['device']}"
    write_results(stem, report, table(report))
    plot(report, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
