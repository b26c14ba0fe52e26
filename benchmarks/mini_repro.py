"""The paper's claim in miniature: with a text shortcut available, does PAPO's perception loss make the policy look?

    python benchmarks/mini_repro.py            # GRPO and PAPO-G, seeds 0-4, 600 steps: ~24 min on 2 CPU cores alone
    python benchmarks/mini_repro.py --steps 2 --seeds 0 --prompts 4 --eval-samples 4 --eval-every 1 --out /tmp/mr

Task `shape_color_hint` (papo_engine/hint_task.py): the image always shows the answer (one coloured shape); the
question ends with "Hint: the answer is <colour>.", right with probability ρ (--rho, 0.7) and wrong otherwise. A
policy that copies the hint scores ρ, one that reads the image 1. Held-out: 2 splits of --eval-samples unseen
images, one where every hint is right and one where every hint is wrong (there only the image gives the answer).

Both methods run the embedded tiny default (papo_engine/config.py) on that task with the same seeds, steps,
prompts and warm-start: for a given seed the model init and the stage-0 warm-start are identical (checked: the
JSON records a checksum of the warm-started weights per run). GRPO is that config with algo.gamma=0 (no masked
branch at all); PAPO-G is the default (γ 0.02). Extra `key=value` arguments go to both.

Measured every --eval-every steps (and at step 0) on both held-out splits, greedy decoding: accuracy; hint
following (the boxed answer equals the hinted colour); perception reliance — per sample, the mean over its
response tokens of the exact KL(π(·|q, I) ‖ π(·|q, I_mask)), I_mask a fixed mask per item (the run's mask
settings, seed 0), the same quantity for both methods. Training metrics per step (reward, accuracy, and for PAPO
the training-time perception KL) come from the trainer.

Each run is its own process; --jobs of them run at once (default: one per core, up to the number of runs) with
cores / jobs torch threads each — two 1-thread runs on 2 cores take about as long as one, where two 2-thread
torch processes slow each other down many times over.

Writes benchmarks/results/mini_repro_<device>.json (per run: curves, final per-sample reliance, training
metrics; "summary": mean, sample std, min, max over seeds per method and split), .md (tables) and .png
(held-out accuracy on hint-wrong items over steps per method, and the other two measures). Budget (2 cores,
machine alone, 1 thread per run, 2026-12-05): ~3.5 min per GRPO run and ~5 min per PAPO-G run (600 steps of 16
prompts x 8, with the ~20 s warm-start and 13 evaluations).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The computations a user can pick for PAPO-G (gamma 0.02 in all), beside GRPO. `--methods` picks among them; the
# default pair is the headline. The computation study runs all five (docs/benchmarks.md).
METHODS = {
    "grpo": ["algo.gamma=0"],                                                  # no masked branch at all
    "papo_g": [],                                                              # ours: both branches, clamp 0.2
    "papo_g_authors": ["algo.masked_grad=false", "algo.perception_kl_clamp=null"],  # masked branch no-grad
    # the presets' computation before this study (papo_g_3b's values: both branches, no clamp, eta 0), and with
    # papo_g_7b's double entropy; the presets now clamp (configs/papo_g_3b.yaml)
    "papo_g_presets": ["algo.perception_kl_clamp=null"],
    "papo_g_presets_eta": ["algo.perception_kl_clamp=null", "algo.eta_orig=0.05", "algo.eta_mask=0.05"],
    "papo_g_nograd_clamp": ["algo.masked_grad=false"],                        # masked branch no-grad, clamp 0.2
}
DEFAULT_METHODS = ["grpo", "papo_g"]
CHANCE = 0.25  # 4 colours
COLLAPSE_AFTER = 100  # a run collapsed if both held-out splits are at or below chance at an evaluation after this step
RUNAWAY_NATS = 5.0  # the perception KL ran away if held-out reliance (mean KL per token, nats) ever exceeds this
BREAK_FORMAT = 0.5  # a training batch broke the format if fewer than this fraction of its responses kept think/box
REACHED = 0.9  # "steps to reach": the first evaluation with hint-wrong accuracy at or above this
SPLITS = ("hint_right", "hint_wrong")
# no checkpoints, plots or W&B: the JSON is the record. The warm-start is the default one: it leaves the colour
# readable at the answer position, as in a pretrained VLM, and teaches neither the colour-to-answer mapping nor to
# ignore the hint, which RL must learn. With the old one (warmup.answer_balance=batch warmup.attribute_probe=false)
# runs sat at a constant-colour chance plateau for 75-300 steps (docs/results.md, superseded).
COMMON = ["trainer.save_every=0", "trainer.save_final=false", "logging.wandb=false", "logging.plot=false",
          "trainer.eval_every=0", "trainer.eval_samples=1"]
TRAIN_KEYS = ("reward", "accuracy", "format", "perception_kl", "perception_reliance_mean", "entropy", "response_length",
              "grad_norm", "lr", "update/pg_clipfrac", "update/ppo_kl", "time/step",  # what an early collapse shows
              "time/old_logprobs", "time/update")  # the training side of a step (its cost beside GRPO's)
EVAL_KEY_OFFSET = 10_000_000  # mask keys of held-out items, far from any training prompt's key
EVAL_MASK_SEED = 0


def weights_checksum(module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate(trainer, dataset, batch_size: int = 50) -> dict:
    """Greedy accuracy, hint following and per-sample perception reliance on `dataset` (HintDataset)."""
    import torch

    from papo_engine.actor import SequenceBatch, response_token_stats
    from papo_engine.masking import mask_prompts
    from papo_engine.rewards import extract_answer
    from papo_engine.rollout.base import SamplingParams

    greedy = SamplingParams(1, 0.0, 1.0, trainer.sampling.max_new_tokens)
    correct, followed, reliance = [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            index = list(range(start, min(start + batch_size, len(dataset))))
            samples = [dataset[i] for i in index]
            prompts = trainer.encode(samples)
            out = trainer.hybrid.generate(prompts, greedy)
            scores = trainer.reward(out.texts, [s.answer for s in samples])
            correct += scores["accuracy"].tolist()
            for text, sample in zip(out.texts, samples):
                predicted = extract_answer(text)
                followed.append(float(predicted is not None and predicted.strip().lower() == sample.hint))
            seqs = SequenceBatch(prompts, out.response_ids, out.response_mask)
            seqs.masked_pixel_values, _ = mask_prompts(trainer.cfg.mask, prompts, [EVAL_KEY_OFFSET + i for i in index],
                                                       1, EVAL_MASK_SEED, trainer.image_processor)
            stats = response_token_stats(trainer.engine.module, seqs, both_branches=True,
                                         temperature=trainer.sampling.temperature)
            mask = seqs.response_mask
            reliance += ((stats["kl"] * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return {"accuracy": statistics.fmean(correct), "hint_follow": statistics.fmean(followed),
            "reliance_mean": statistics.fmean(reliance), "reliance_median": statistics.median(reliance),
            "per_sample_reliance": reliance}


def run_overrides(method: str, seed: int, output_dir: str, steps: int = 600, prompts: int = 16, rho: float = 0.7,
                  extra: tuple = ()) -> list[str]:
    """The config overrides of one run of the study (defaults: this script's)."""
    return [*COMMON, "data.task=shape_color_hint", f"data.hint_accuracy={rho}", f"trainer.seed={seed}",
            f"trainer.steps={steps}", f"trainer.prompts_per_step={prompts}", f"trainer.output_dir={output_dir}",
            *METHODS[method], *extra]


def run_one(method: str, seed: int, args, out_root: str) -> dict:
    from papo_engine.config import load_config
    from papo_engine.hint_task import HintDataset
    from papo_engine.trainer import PAPOTrainer

    overrides = run_overrides(method, seed, f"{out_root}/{method}_seed{seed}", args.steps, args.prompts, args.rho,
                              args.overrides)
    if args.warmup_steps is not None:
        overrides.append(f"warmup.steps={args.warmup_steps}")
    cfg = load_config(None, overrides)
    started = time.perf_counter()
    trainer = PAPOTrainer(cfg)
    checksum = weights_checksum(trainer.engine.module)
    splits = {name: HintDataset("eval", args.eval_samples, cfg.data.seed, cfg.data.image_size, args.rho,
                                hint=name.removeprefix("hint_")) for name in SPLITS}

    def measure(step: int) -> dict:
        point = {"step": step}
        for name, dataset in splits.items():
            point[name] = evaluate(trainer, dataset)
        print(f"{method} seed {seed} step {step}: " + ", ".join(
            f"{name} acc {point[name]['accuracy']:.2f} follow {point[name]['hint_follow']:.2f} "
            f"reliance {point[name]['reliance_mean']:.3f}" for name in SPLITS), flush=True)
        return point

    curve, train = [measure(0)], []
    for step in range(args.stop_after or args.steps):  # --stop-after: the first steps of the full schedule
        metrics = trainer.train_step(step)
        train.append({"step": step, **{k: metrics[k] for k in TRAIN_KEYS if k in metrics}})
        if (step + 1) % args.eval_every == 0 or step + 1 == (args.stop_after or args.steps):
            curve.append(measure(step + 1))
    trainer.tracker.close()
    final = curve[-1]
    for point in curve[:-1]:  # per-sample values are kept for the final evaluation only
        for name in SPLITS:
            point[name].pop("per_sample_reliance")
    run = {"method": method, "seed": seed, "overrides": overrides, "warm_start_checksum": checksum,
           "seconds": time.perf_counter() - started, "curve": curve, "train": train,
           "final": {name: final[name] for name in SPLITS}}
    return run


def run_in_process(method: str, seed: int, args, out_root: str, threads: int) -> dict:
    """run_one in a fresh process with `threads` torch threads; its progress lines go to this stdout."""
    result = Path(out_root, f"{method}_seed{seed}.json")
    argv = [sys.executable, __file__, "--worker", method, str(seed), str(result), "--steps", str(args.steps),
            "--prompts", str(args.prompts), "--rho", str(args.rho), "--eval-samples", str(args.eval_samples),
            "--eval-every", str(args.eval_every), "--stop-after", str(args.stop_after), *(["--warmup-steps", str(args.warmup_steps)]
                                                    if args.warmup_steps is not None else []), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"mini_repro: {method} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def collapsed(run: dict) -> bool:
    """At an evaluation after step COLLAPSE_AFTER, accuracy at or below chance on both splits at once: the answer
    follows neither the image nor the hint (a constant answer, or a broken format). A hint-copier is not collapsed
    (it scores 1 where the hint is right); it shows as hint-wrong accuracy near 0."""
    return any(all(point[name]["accuracy"] <= CHANCE for name in SPLITS)
               for point in run["curve"] if point["step"] > COLLAPSE_AFTER)


def broken_steps(run: dict) -> list[int]:
    """Training steps whose batch has an answer-format fraction below BREAK_FORMAT."""
    return [row["step"] for row in run["train"] if row["format"] < BREAK_FORMAT]


def kl_ran_away(run: dict) -> bool:
    """Held-out perception reliance above RUNAWAY_NATS at any evaluation: the KL raised by degrading a branch."""
    return any(point[name]["reliance_mean"] > RUNAWAY_NATS for point in run["curve"] for name in SPLITS)


def steps_to_reach(run: dict, split: str = "hint_wrong", level: float = REACHED) -> int | None:
    """The step of the first evaluation whose `split` accuracy is at least `level` (None: never within the run)."""
    return next((point["step"] for point in run["curve"] if point[split]["accuracy"] >= level), None)


def step_seconds(run: dict) -> dict:
    """Median seconds per step over the run's steps after the first 10 (allocations): the whole step, and its
    training side (old log-probs + update: what the PAPO computation changes; the rollout does not depend on it)."""
    rows = run["train"][10:] or run["train"]
    return {"step": statistics.median(r["time/step"] for r in rows),
            "training_side": statistics.median(r.get("time/old_logprobs", 0.0) + r["time/update"] for r in rows)}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        summary[method] = {"seeds": [r["seed"] for r in mine]}
        for name in SPLITS:
            summary[method][name] = {k: _spread([r["final"][name][k] for r in mine])
                                     for k in ("accuracy", "hint_follow", "reliance_mean")}
        last = [statistics.fmean(row["reward"] for row in r["train"][-max(1, len(r["train"]) // 5):]) for r in mine]
        summary[method]["train_reward_last_20pct"] = _spread(last)
        summary[method]["collapsed_seeds"] = [r["seed"] for r in mine if collapsed(r)]
        summary[method]["kl_runaway_seeds"] = [r["seed"] for r in mine if kl_ran_away(r)]
        summary[method]["broken_format_batches"] = [len(broken_steps(r)) for r in mine]
        summary[method]["steps_to_reach_hint_wrong"] = [steps_to_reach(r) for r in mine]
        if all("time/update" in row for r in mine for row in r["train"]):
            times = [step_seconds(r) for r in mine]
            summary[method]["step_s"] = _spread([t["step"] for t in times])
            summary[method]["training_side_s"] = _spread([t["training_side"] for t in times])
    if "grpo" in summary and "step_s" in summary["grpo"]:  # cost beside GRPO, paired by seed
        base = {r["seed"]: step_seconds(r) for r in runs if r["method"] == "grpo"}
        for method in summary:
            mine = [r for r in runs if r["method"] == method and r["seed"] in base]
            if method != "grpo" and "step_s" in summary[method] and mine:
                summary[method]["step_over_grpo"] = _spread(
                    [step_seconds(r)["step"] / base[r["seed"]]["step"] for r in mine])
                summary[method]["training_side_over_grpo"] = _spread(
                    [step_seconds(r)["training_side"] / base[r["seed"]]["training_side"] for r in mine])
    seeds = {r["seed"] for r in runs}
    summary["same_warm_start_per_seed"] = all(len({r["warm_start_checksum"] for r in runs if r["seed"] == s}) == 1
                                              for s in seeds)
    return summary


SETTINGS = ("device", "steps", "stop_after", "rho", "prompts_per_step", "eval_samples", "eval_every")


def _shared_overrides(run: dict) -> list[str]:
    """A run's overrides less what differs by design between runs: its method's, its seed and its output folder."""
    own = set(METHODS[run["method"]]) | {f"trainer.seed={run['seed']}"}
    return [o for o in run["overrides"] if o not in own and not o.startswith("trainer.output_dir=")]


def merge(sources: list[tuple[str, dict]]) -> dict:
    """One report from the runs of several (a study run in parts): the same settings and overrides in every run,
    each (method, seed) once. Raises ValueError naming the file and what differs."""
    first_name, first = sources[0]
    expected = _shared_overrides(first["runs"][0])
    runs, origin = [], {}
    for name, report in sources:
        for key in SETTINGS:
            if report[key] != first[key]:
                raise ValueError(f"{name}: {key} = {report[key]!r}, but {first_name} has {first[key]!r}")
        for run in report["runs"]:
            mine = _shared_overrides(run)
            if mine != expected:
                raise ValueError(f"{name}: {run['method']} seed {run['seed']} ran with "
                                 f"{[o for o in mine if o not in expected] or 'no more'} and without "
                                 f"{[o for o in expected if o not in mine] or 'none'} of the overrides in {first_name}")
            if (run["method"], run["seed"]) in origin:
                raise ValueError(f"{name}: {run['method']} seed {run['seed']} is in {origin[run['method'], run['seed']]} too")
            origin[run["method"], run["seed"]] = name
            runs.append(run)
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    runs.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    merged = {key: first[key] for key in ("platform", *SETTINGS)}
    merged.update(seeds=sorted({r["seed"] for r in runs}), methods=methods, runs=runs,
                  merged_from=[{"file": name, "command": report["command"], "jobs": report["jobs"],
                                "torch_threads": report["torch_threads"]} for name, report in sources])
    merged["summary"] = summarize(runs)
    return merged


def table(report: dict) -> str:
    s, lines = report["summary"], []
    lines.append(f"# Mini reproduction on {report['device']}: {report['steps']} steps, seeds {report['seeds']}, "
                 f"rho = {report['rho']}, {report['eval_samples']} held-out items per split")
    lines += ["", "Final greedy held-out measures, mean ± sample std over seeds (min–max):", "",
              "| method | split | accuracy | hint followed | perception reliance (mean KL) |", "|---|---|---|---|---|"]
    for method in report["methods"]:
        for name in SPLITS:
            cells = [f"{v['mean']:.3f} ± {v['std']:.3f} ({v['min']:.2f}–{v['max']:.2f})"
                     for v in (s[method][name][k] for k in ("accuracy", "hint_follow", "reliance_mean"))]
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Collapsed (both splits at or below chance, {CHANCE}, at an evaluation after step {COLLAPSE_AFTER}), "
              f"perception KL ran away (held-out reliance above {RUNAWAY_NATS:g} nats at an evaluation), seeds; "
              f"training batches with format below {BREAK_FORMAT} per seed:", "",
              "| method | collapsed | KL ran away | broken-format batches |", "|---|---|---|---|"]
    lines += [f"| {m} | {s[m]['collapsed_seeds'] or 'none'} | {s[m]['kl_runaway_seeds'] or 'none'} | "
              f"{s[m]['broken_format_batches']} |" for m in report["methods"]]
    if any("step_s" in s[m] for m in report["methods"]):
        def cell(v, unit=""):
            return f"{v['mean']:.3f}{unit} ± {v['std']:.3f}" if v else "–"
        lines += ["", f"Speed: steps to reach {REACHED} hint-wrong accuracy (first evaluation at or above it, per "
                  f"seed; None = not within the run); median step time and its training side (old log-probs + "
                  f"update) after the first 10 steps, mean ± std over seeds, and paired by seed ÷ GRPO's (runs "
                  f"{report.get('jobs', '?')} at a time, {report.get('torch_threads', '?')} torch thread(s) each):", "",
                  "| method | steps to reach | step (s) | training side (s) | step ÷ GRPO | training side ÷ GRPO |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {s[m]['steps_to_reach_hint_wrong']} | {cell(s[m].get('step_s'))} | "
                  f"{cell(s[m].get('training_side_s'))} | {cell(s[m].get('step_over_grpo'), '×')} | "
                  f"{cell(s[m].get('training_side_over_grpo'), '×')} |" for m in report["methods"]]
    lines += ["", "Per seed (final): accuracy hint-right / hint-wrong, training reward over the last 20% of steps:", "",
              "| method | seed | hint-right acc | hint-wrong acc | hint-wrong followed | train reward | minutes |",
              "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        k = max(1, len(r["train"]) // 5)
        reward = statistics.fmean(row["reward"] for row in r["train"][-k:])
        lines.append(f"| {r['method']} | {r['seed']} | {r['final']['hint_right']['accuracy']:.3f} | "
                     f"{r['final']['hint_wrong']['accuracy']:.3f} | {r['final']['hint_wrong']['hint_follow']:.3f} | "
                     f"{reward:.3f} | {r['seconds'] / 60:.1f} |")
    lines += ["", f"Same warm-start for both methods on every seed: {s['same_warm_start_per_seed']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("hint_wrong", "accuracy", "held-out accuracy, hint WRONG"),
              ("hint_right", "accuracy", "held-out accuracy, hint right"),
              ("hint_wrong", "reliance_mean", "perception reliance (mean KL), hint wrong")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colors = {"grpo": "tab:blue", "papo_g": "tab:red", "papo_g_authors": "tab:green", "papo_g_presets": "tab:purple",
              "papo_g_presets_eta": "tab:orange"}
    for ax, (split, key, title) in zip(axes, panels):
        for method in report["methods"]:
            runs = [r for r in report["runs"] if r["method"] == method]
            for r in runs:
                ax.plot([p["step"] for p in r["curve"]], [p[split][key] for p in r["curve"]],
                        color=colors.get(method), alpha=0.35, linewidth=1)
            steps = [p["step"] for p in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][i][split][key] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, color=colors.get(method), linewidth=2.5, label=f"{method} (mean of {len(runs)})")
        if key == "accuracy":  # chance from the image alone; a pure hint-copier scores 0 (wrong) or 1 (right)
            ax.axhline(0.25, color="gray", linestyle="--", linewidth=1, label="chance (4 colours)")
            ax.set_ylim(-0.02, 1.02)
        else:  # a run-away KL reaches tens of nats, a healthy one stays below 1
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x rollout.n responses)")
    parser.add_argument("--rho", type=float, default=0.7, help="probability that a training hint is right")
    parser.add_argument("--eval-samples", type=int, default=100, help="held-out items per split")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=None, help="stage-0 steps (default: the config's)")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="train only the first N of --steps steps (the same lr schedule): the early phase")
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (default: one per core, up to the runs)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "SEED", "RESULT_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for mini_repro_<device>.{json,md,png}")
    parser.add_argument("--variant", default="", help="a name for the task variant (--rho, --steps, overrides): the "
                                                      "files are mini_repro_<variant>_<device>.*")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="instead of running: one record from earlier mini_repro JSONs of the same settings")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args()
    if not 0.0 <= args.rho <= 1.0 or args.steps < 1 or args.eval_every < 1 or args.eval_samples < 1:
        parser.error("--rho must be in [0, 1]; --steps, --eval-every and --eval-samples must be >= 1")
    if not 0 <= args.stop_after <= args.steps:
        parser.error("--stop-after must be in [0, --steps] (0: all steps)")
    if args.jobs < 0:
        parser.error("--jobs must be >= 0 (0: one per core)")
    sys.path.insert(0, str(ROOT))
    if args.worker:
        method, seed, result = args.worker
        with tempfile.TemporaryDirectory() as out_root:
            Path(result).write_text(json.dumps(run_one(method, int(seed), args, out_root)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mini_repro_{args.variant + '_' if args.variant else ''}{device_name()}"
    if args.merge:
        try:
            report = merge([(str(path), json.loads(path.read_text())) for path in args.merge])
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"mini_repro --merge: {error}") from None
        report["command"] = " ".join(sys.argv)
        return write(report, stem)
    report = {"device": device_name(), "platform": platform.platform(), "command": " ".join(sys.argv),
              "variant": args.variant,
              "steps": args.steps, "stop_after": args.stop_after, "seeds": args.seeds, "methods": args.methods, "rho": args.rho,
              "prompts_per_step": args.prompts, "eval_samples": args.eval_samples, "eval_every": args.eval_every,
              "runs": []}
    order = [(seed, method) for seed in args.seeds for method in args.methods]  # seed-major: partial = paired
    jobs = args.jobs or min(os.cpu_count() or 1, len(order))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    report.update(jobs=jobs, torch_threads=threads)
    with tempfile.TemporaryDirectory() as out_root, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_in_process, method, seed, args, out_root, threads) for seed, method in order]
        for future in futures:
            report["runs"].append(future.result())
            report["summary"] = summarize(report["runs"])
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1))  # partial results survive a crash
    write(report, stem)


TRAIN_EVERY = 10  # the committed JSON keeps every 10th step's training metrics (the summary saw every step)


def compact(report: dict) -> dict:
    """The report as committed (under ~1 MB): per run of more than 100 steps, the training metrics of every
    TRAIN_EVERY-th step and of every broken-format step, and its median step times; the summary was computed from
    every step before (`--merge` of compacted files recounts from the kept rows)."""
    runs = []
    for run in report["runs"]:
        broken = set(broken_steps(run))
        kept = [row for row in run["train"] if row["step"] % TRAIN_EVERY == 0 or row["step"] in broken
                or len(run["train"]) <= 100]  # short runs (smoke tests, the early phase) keep every step
        timing = step_seconds(run) if all("time/update" in row for row in run["train"]) else None
        runs.append({**run, "train": kept, "train_rows_kept": f"every {TRAIN_EVERY}th step and the broken-format "
                     f"ones, of {len(run['train'])}", **({"median_step_seconds": timing} if timing else {})})
    return {**report, "runs": runs}


def write(report: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(compact(report), indent=1))
    stem.with_suffix(".md").write_text(table(report))
    plot(report, stem.with_suffix(".png"))
    print(table(report))
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
