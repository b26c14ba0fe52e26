"""GRPO vs PAPO training steps on one GPU, in one call: a released Qwen2.5-VL architecture with random weights
(`model.architecture`), bf16, DeepSpeed ZeRO-2, HF `generate` rollouts, the fused head in the loop.

    python benchmarks/gpu_step.py                  # qwen2.5-vl-3b shapes (bash benchmarks/gpu_step.sh on a bare GPU)
    python benchmarks/gpu_step.py --smoke          # the tiny model at tiny shapes (any machine: checks the script)

Stages, in order; the JSON is re-written after each, so a run cut short keeps what it measured:
1. steps: GRPO, PAPO `official` and PAPO (default) take their steps in turn (the order rotating each round; the
   first round is dropped). The three modes share ONE model and optimizer (a 3B model's ZeRO-2 states are tens of
   GB; three copies would not fit): each mode is a shallow copy of one trainer with its own algorithm settings.
   Per step: the phase times and the peak GPU memory.
2. memory: one PAPO update (both branches with gradient, the 2B forward) on a synthetic batch (task prompts,
   random full-length responses) at growing micro-batch sizes, with the fused head and with eager logits
   (`kernels.fused_head=false`): time and peak memory each, up to the first out-of-memory error per head.
Rollout: HF `generate`, not vLLM (vLLM's CUDA wheel is far over what one device call can carry), so the rollout
share of the step is larger than with vLLM; the table gives the training-side ratio (step minus rollout) too.
Writes <out-dir>/gpu_step_<device>.{json,md} (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts
from throughput import ALGORITHMS, COMMON, MODES, PHASES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # n = 5, ~448 x 448 images (256 image tokens), 256 response tokens, as in the issue
    "full": ["model.architecture=qwen2.5-vl-3b", "model.dtype=bfloat16", "deepspeed.zero_stage=2",
             "data.image_size=448", "rollout.n=5", "rollout.max_new_tokens=256", "trainer.prompts_per_step=4",
             "trainer.micro_batch_size=5", "rollout.batch_size=20", "optim.lr=1e-6", "data.train_size=256",
             "data.eval_size=8"],
    "smoke": ["rollout.n=2", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2",
              "trainer.micro_batch_size=2", "data.train_size=32", "data.eval_size=4"],
}
MEMORY_MICRO_BATCHES = {"full": [5, 10, 15, 20], "smoke": [2, 4]}
GIB = 2**30


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if cuda() else None


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def environment() -> dict:
    import transformers
    import triton
    env = {"device": device_name(), "platform": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    if cuda():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, multiprocessors=props.multi_processor_count,
                   cuda=torch.version.cuda)
    return env


def mode_trainers(shape: str, overrides: list[str], out_root: str) -> dict:
    """{mode: trainer}: one PAPOTrainer (one model, one DeepSpeed engine) and a shallow copy per other mode with
    that mode's algorithm settings; each copy keeps its own data cursor and history."""
    from papo_engine.config import load_config
    from papo_engine.trainer import PAPOTrainer

    def config(mode: str):
        return load_config(None, [*COMMON, *SHAPES[shape], *overrides, *MODES[mode],
                                  f"trainer.output_dir={out_root}/{mode}"])

    base = PAPOTrainer(config("papo"))
    trainers = {}
    for mode in ALGORITHMS:
        view = copy.copy(base)
        view.cfg, view.history = config(mode), []
        view.derive_algorithm()
        trainers[mode] = view
    return trainers


def run_steps(trainers: dict, rounds: int, report: dict, save) -> None:
    names = list(trainers)
    rows = {m: [] for m in names}
    for step in range(rounds):
        for mode in names[step % 3:] + names[:step % 3]:
            reset_peak()
            metrics = trainers[mode].train_step(step)
            row = {"step_s": metrics["time/step"], "peak_gib": peak_gib(),
                   **{f"{p}_s": metrics.get(f"time/{p}", 0.0) for p in PHASES},
                   "response_length": metrics["response_length"]}
            if step > 0:
                rows[mode].append(row)
            print(f"round {step} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None),
                  flush=True)
        report["steps"] = summarize_steps(rows)
        save()


def summarize_steps(rows: dict) -> dict:
    out = {"modes": {}, "rows": rows}
    for mode, steps in rows.items():
        if not steps:
            continue
        med = {k: statistics.median(r[k] for r in steps) for k in steps[0] if steps[0][k] is not None}
        med["train_side_s"] = statistics.median(r["step_s"] - r["rollout_s"] for r in steps)
        med["steps_measured"] = len(steps)
        med["peak_gib_max"] = max(r["peak_gib"] for r in steps) if steps[0]["peak_gib"] is not None else None
        out["modes"][mode] = med
    if rows.get("grpo"):
        for mode in ("papo_official", "papo"):
            pairs = list(zip(rows[mode], rows["grpo"]))
            if pairs:
                out[f"{mode}_over_grpo_step"] = statistics.median(a["step_s"] / b["step_s"] for a, b in pairs)
                out[f"{mode}_over_grpo_train_side"] = statistics.median(
                    (a["step_s"] - a["rollout_s"]) / (b["step_s"] - b["rollout_s"]) for a, b in pairs)
    return out


def synthetic_batch(trainer, prompts: int):
    """`prompts` task prompts x n responses of max_new_tokens random ordinary tokens (no EOS, no vision tokens),
    masked images attached, on the training device; and random advantages."""
    from papo_engine.actor import SequenceBatch
    from papo_engine.batching import repeat_prompts
    from papo_engine.masking import mask_prompts

    n, length = trainer.sampling.n, trainer.sampling.max_new_tokens
    samples, keys = trainer.next_prompts(prompts)
    encoded = trainer.encode(samples)
    special = set(trainer.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(trainer.tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(0)
    ids = ordinary[torch.randint(len(ordinary), (prompts * n, length), generator=generator)]
    seqs = SequenceBatch(repeat_prompts(encoded, n), ids, torch.ones(prompts * n, length),
                         prompt_group=torch.arange(prompts).repeat_interleave(n))
    seqs.masked_pixel_values, _ = mask_prompts(trainer.cfg.mask, encoded, keys, n, trainer.cfg.trainer.seed,
                                               trainer.image_processor)
    advantages = torch.randn(prompts * n, generator=generator)
    return seqs.to(trainer.device), advantages.to(trainer.device)


def timed_update(trainer, micro_batch: int, fused: bool) -> dict:
    """One update (one optimizer step) over `micro_batch` sequences in one micro-batch."""
    n = trainer.sampling.n
    seqs, advantages = synthetic_batch(trainer, math.ceil(micro_batch / n))
    seqs, advantages = seqs.slice(0, micro_batch), advantages[:micro_batch]
    head, settings = trainer.engine.module.lm_head, trainer.cfg.trainer
    saved = head.fused, settings.micro_batch_size
    head.fused, settings.micro_batch_size = fused, micro_batch
    try:
        sync()
        reset_peak()
        start_gib = torch.cuda.memory_allocated() / GIB if cuda() else None
        start = time.perf_counter()
        old = trainer.old_stats(seqs)
        trainer.update(seqs, advantages, old, trainer.cfg.algo.gamma)
        sync()
        return {"micro_batch": micro_batch, "fused_head": fused, "seconds": time.perf_counter() - start,
                "peak_gib": peak_gib(), "start_gib": start_gib}
    finally:
        head.fused, settings.micro_batch_size = saved


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_memory(trainer, sizes: list[int], report: dict, save) -> None:
    """One PAPO update per (micro-batch size, head), ascending sizes, each timed twice (the second kept: the first
    pays the allocator's growth). A head that runs out of memory drops out; fused runs before eager at each size,
    so no fused measurement follows an out-of-memory error (which can leave DeepSpeed's gradient buckets unusable)."""
    memory = report.setdefault("memory", {"updates": [], "largest_micro_batch": {}})
    heads = [True, False]
    for size in sizes:
        for fused in list(heads):
            name = "fused" if fused else "eager"
            try:
                timed_update(trainer, size, fused)
                memory["updates"].append(timed_update(trainer, size, fused))
                memory["largest_micro_batch"].setdefault(name, {})["ran"] = size
                print(f"memory {name} {size}:", json.dumps(memory["updates"][-1]), flush=True)
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                memory["largest_micro_batch"].setdefault(name, {})["out_of_memory"] = size
                heads.remove(fused)
                trainer.engine.module.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"memory {name} {size}: out of memory", flush=True)
            save()


def table(report: dict) -> str:
    env = report["environment"]
    lines = [f"# PAPO training steps on {env.get('gpu', env['device'])}",
             "", f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
                 f"deepspeed {env['deepspeed']}; overrides: {' '.join(report['overrides']) or 'none'}", ""]
    steps = report.get("steps", {})
    if steps.get("modes"):
        head = ["mode", "step (s)", "/ GRPO", "train side (s)", "/ GRPO", *[f"{p} (s)" for p in PHASES],
                "peak GiB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode, m in steps["modes"].items():
            step_ratio = steps.get(f"{mode}_over_grpo_step", 1.0)
            side_ratio = steps.get(f"{mode}_over_grpo_train_side", 1.0)
            peak = "" if m.get("peak_gib_max") is None else f"{m['peak_gib_max']:.1f}"
            cells = [mode, f"{m['step_s']:.3f}", f"{step_ratio:.3f}", f"{m['train_side_s']:.3f}", f"{side_ratio:.3f}",
                     *[f"{m[f'{p}_s']:.3f}" for p in PHASES], peak]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    memory = report.get("memory", {})
    if memory.get("updates"):
        lines += ["One PAPO update (both branches with gradient), synthetic batch:", "",
                  "| micro-batch (sequences) | head | time (s) | peak GiB |", "|---|---|---|---|"]
        for u in memory["updates"]:
            peak = "" if u["peak_gib"] is None else f"{u['peak_gib']:.1f}"
            lines.append(f"| {u['micro_batch']} | {'fused' if u['fused_head'] else 'eager logits'} | "
                         f"{u['seconds']:.3f} | {peak} |")
        for head, e in memory.get("largest_micro_batch", {}).items():
            oom = f"; {e['out_of_memory']} ran out of memory" if "out_of_memory" in e else ""
            lines.append(f"\nLargest micro-batch tried that ran, {head} head: {e.get('ran', 'none')} sequences{oom}.")
    for stage, err in report.get("errors", {}).items():
        lines.append(f"\nStage {stage} failed: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model at tiny shapes (checks the script)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of steps (each mode once; the first dropped)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--stages", default="steps,memory")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every mode")
    args = parser.parse_args()
    shape = "smoke" if args.smoke else "full"
    report = {"environment": environment(), "shape": SHAPES[shape], "overrides": args.overrides,
              "rounds": args.rounds, "errors": {}}
    stem = Path(args.out_dir) / f"gpu_step_{report['environment']['device']}{'_smoke' if args.smoke else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        stem.with_suffix(".md").write_text(table(report))

    print(json.dumps(report["environment"]), flush=True)
    save()
    with tempfile.TemporaryDirectory() as out_root:
        start = time.perf_counter()
        trainers = mode_trainers(shape, args.overrides, out_root)
        report["build_s"] = time.perf_counter() - start
        stages = {"steps": lambda: run_steps(trainers, args.rounds, report, save),
                  "memory": lambda: run_memory(trainers["papo"], MEMORY_MICRO_BATCHES[shape], report, save)}
        for name in args.stages.split(","):
            try:
                stages[name]()
            except Exception:  # noqa: BLE001 — recorded; the stages after it still run
                report["errors"][name] = traceback.format_exc()
                print(report["errors"][name], file=sys.stderr, flush=True)
            save()
    print(table(report))
    if report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
