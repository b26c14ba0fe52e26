"""Benchmark of the fused two-policy head: time (forward, forward+backward) and peak extra memory of each backend
against eager torch, over a sweep of (N, d, V); writes benchmarks/results/kernels_<device>.{json,md}.

    python benchmarks/kernels.py                 # CPU: eager vs cpp vs torch-chunked
    python benchmarks/kernels.py --device cuda   # GPU: eager vs triton vs torch-chunked (same script)
    python benchmarks/kernels.py --quick         # headline shape only

Eager = what a trainer does without the op: logits = h·Wᵀ in the input dtype, upcast to fp32, log_softmax,
entropy and KL over the materialized [N, V] logits, autograd backward.  All five outputs feed the loss with a
different random weight per token (sum(out_k · g_k)), so every gradient path runs.

Timing: min over interleaved repetitions (this CPU is shared; min is the least-disturbed run).
Peak extra memory: CPU — a fresh subprocess per (case, backend) builds the inputs, runs one warm-up at a tiny
shape, resets the kernel's RSS high-water mark (/proc/self/clear_refs = 5), runs forward+backward, and reports
VmHWM − RSS before the run.  CUDA — torch.cuda.max_memory_allocated() during forward+backward − memory allocated
before it.  Both count the gradients (dW alone is V·d elements) for every backend.  Out-of-memory is recorded,
not raised.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("logprobs", "logprobs_masked", "entropy", "entropy_masked", "kl")

CPU_HEADLINE = (2048, 512, 32768, "fp32")
CUDA_HEADLINE = (8192, 3584, 152064, "bf16")
CPU_SWEEP = [(512, 512, 32768, "fp32"), (2048, 256, 32768, "fp32"), (2048, 512, 8192, "fp32"),
             (1024, 512, 32768, "bf16"), (128, 512, 152064, "fp32")]
CUDA_SWEEP = [(4096, 3584, 152064, "bf16"), (8192, 3584, 152064, "fp32"), (16384, 3584, 152064, "bf16"),
              (8192, 4096, 32768, "bf16"), (4096, 1024, 152064, "bf16")]


# ----------------------------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------------------------
def eager_papo_head(h, hm, w, y, temperature=1.0):
    """The materializing baseline (two [N, V] fp32 logit matrices and their softmax temporaries)."""
    a = (h @ w.t()).float() / temperature
    b = (hm @ w.t()).float() / temperature
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = logp.exp(), logq.exp()
    lp = logp.gather(-1, y[:, None]).squeeze(-1)
    lq = logq.gather(-1, y[:, None]).squeeze(-1)
    return lp, lq, -(p * logp).sum(-1), -(q * logq).sum(-1), (p * (logp - logq)).sum(-1)


def make_op(backend):
    if backend == "eager":
        return eager_papo_head
    import papo_kernels

    return lambda h, hm, w, y: papo_kernels.fused_papo_head(h, hm, w, y, 1.0, backend=backend)


def make_inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g) / d**0.5 * 2
    hm = h + 0.3 * torch.randn(n, d, generator=g) / d**0.5 * 2
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    gr = torch.randn(5, n, generator=g)
    return (h.to(device, dtype), hm.to(device, dtype), w.to(device, dtype), y.to(device), gr.to(device))


def step(op, inputs, backward):
    h, hm, w, y, gr = inputs
    if backward:
        h, hm, w = (t.detach().requires_grad_() for t in (h, hm, w))
    out = op(h, hm, w, y)
    if backward:
        loss = sum((o.float() * g).sum() for o, g in zip(out, gr))
        grads = torch.autograd.grad(loss, (h, hm, w))
        return out, grads
    return out, None


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(exc):
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() or \
        isinstance(exc, MemoryError)


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_probe(backend, n, d, v, dt, device):
    """Peak extra memory (bytes) of one forward+backward; runs in the current (fresh) process."""
    op = make_op(backend)
    warm = make_inputs(8, d, 64, DTYPES[dt], device)
    step(op, warm, True)                        # builds/loads extensions, spins up thread pools
    inputs = make_inputs(n, d, v, DTYPES[dt], device)
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step(op, inputs, True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out, inputs
        torch.cuda.empty_cache()
        return peak
    import gc

    gc.collect()
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
        f.write("5")
    out = step(op, inputs, True)
    peak = _rss_kb("VmHWM")
    del out
    return (peak - base) * 1024


def measure_memory(backend, case, device):
    """CPU: a fresh subprocess per (case, backend) (RSS high-water marks cannot be reset per allocation);
    CUDA: in this process, from the caching allocator's peak counter."""
    n, d, v, dt = case
    if device == "cuda":
        try:
            return {"peak_extra_bytes": int(memory_probe(backend, n, d, v, dt, device))}
        except Exception as exc:  # noqa: BLE001
            torch.cuda.empty_cache()
            if is_oom(exc):
                return {"error": "oom"}
            raise
    cmd = [sys.executable, __file__, "--_probe", backend, str(n), str(d), str(v), dt, device]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    m = re.search(r"PROBE (\{.*\})", res.stdout)
    if not m:
        tail = (res.stdout + res.stderr)[-400:]
        return {"error": "oom" if "out of memory" in tail.lower() or res.returncode in (-9, 137) else tail}
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------------------------------
def time_backends(backends, case, device, reps):
    """Interleaved repetitions; returns {backend: {"forward_s", "fwd_bwd_s"} or {"error"}}."""
    n, d, v, dt = case
    inputs = make_inputs(n, d, v, DTYPES[dt], device)
    ops = {b: make_op(b) for b in backends}
    times = {b: {"forward_s": [], "fwd_bwd_s": []} for b in backends}
    errors = {}
    for rep in range(reps + 1):                 # rep 0 is the warm-up (JIT build, autotune, allocator)
        for b in backends:
            if b in errors:
                continue
            for key, bwd in (("forward_s", False), ("fwd_bwd_s", True)):
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    out = step(ops[b], inputs, bwd)
                    sync(device)
                    dt_s = time.perf_counter() - t0
                    del out
                except Exception as exc:  # noqa: BLE001 — record OOM and keep going
                    if not is_oom(exc):
                        raise
                    errors[b] = "oom"
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    break
                if rep > 0:
                    times[b][key].append(dt_s)
    res = {}
    for b in backends:
        if b in errors:
            res[b] = {"error": errors[b]}
        else:
            res[b] = {k: min(vs) for k, vs in times[b].items()}
            res[b]["reps"] = reps
    return res


def check_agreement(backends, device):
    """A small-shape check that every timed backend computes the same thing as eager (guards the numbers)."""
    inputs = make_inputs(64, 64, 3001, torch.float32, device, seed=1)
    ref_out, ref_g = step(make_op("eager"), inputs, True)
    errs = {}
    for b in backends:
        if b == "eager":
            continue
        out, g = step(make_op(b), inputs, True)
        e = max([((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(out, ref_out)]
                + [((x - r).abs().max() / r.abs().max()).item() for x, r in zip(g, ref_g)])
        errs[b] = e
        assert e < 1e-4, f"backend {b} disagrees with eager: max rel err {e:.2e}"
    return errs


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def device_slug(device):
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def fmt_bytes(x):
    return f"{x / 2**20:.1f} MiB" if isinstance(x, (int, float)) else str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="headline shape only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--shape", default=None, help="headline override N,d,V,dtype (e.g. 256,64,1000,fp32)")
    ap.add_argument("--_probe", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._probe:
        backend, n, d, v, dt, device = args._probe
        try:
            peak = memory_probe(backend, int(n), int(d), int(v), dt, device)
            print("PROBE " + json.dumps({"peak_extra_bytes": int(peak)}))
        except Exception as exc:  # noqa: BLE001
            print("PROBE " + json.dumps({"error": "oom" if is_oom(exc) else repr(exc)[:300]}))
        return

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    fused = "triton" if device == "cuda" else "cpp"
    backends = ["eager", fused, "torch"]
    headline = CUDA_HEADLINE if device == "cuda" else CPU_HEADLINE
    if args.shape:
        n_, d_, v_, dt_ = args.shape.split(",")
        headline = (int(n_), int(d_), int(v_), dt_)
    cases = [headline] + ([] if args.quick else (CUDA_SWEEP if device == "cuda" else CPU_SWEEP))

    load_before = os.getloadavg()
    agreement = check_agreement(backends, device)
    print(f"agreement with eager at N=64, d=64, V=3001 (max rel err): {agreement}", flush=True)

    rows = []
    for case in cases:
        n, d, v, dt = case
        t0 = time.perf_counter()
        # the chunked torch path only joins the headline on CPU and the smaller shapes (it is the fallback)
        bs = backends if (case == headline or n * v <= 2048 * 32768) else [b for b in backends if b != "torch"]
        timing = time_backends(bs, case, device, args.reps)
        mem = {} if args.no_memory else {b: measure_memory(b, case, device) for b in bs}
        row = {"N": n, "d": d, "V": v, "dtype": dt, "headline": case == headline, "backends": {}}
        for b in bs:
            row["backends"][b] = {**timing[b], **mem.get(b, {})}
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.1f}s] N={n} d={d} V={v} {dt}: "
              + "; ".join(f"{b}: {row['backends'][b]}" for b in bs), flush=True)

    head = rows[0]["backends"]

    def ratio(key):
        e, f = head.get("eager", {}), head.get(fused, {})
        if key in e and key in f and e[key]:
            return f[key] / e[key]
        return None

    summary = {
        "shape": {"N": headline[0], "d": headline[1], "V": headline[2], "dtype": headline[3]},
        "fused_backend": fused,
        "fused_vs_eager_forward_time_ratio": ratio("forward_s"),
        "fused_vs_eager_time_ratio": ratio("fwd_bwd_s"),
        "fused_vs_eager_peak_memory_ratio": ratio("peak_extra_bytes"),
        "eager_error": head.get("eager", {}).get("error"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "torch_version": torch.__version__,
    }
    if device == "cpu":
        summary["cpu_threads"] = torch.get_num_threads()
        # other processes on a shared machine inflate both eager and fused times; recorded, not corrected
        summary["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        try:
            summary["device_name"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                          if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        import triton

        summary["triton_version"] = triton.__version__
    except ImportError:
        pass
    result = {"summary": summary, "agreement_max_rel_err": agreement, "cases": rows,
              "method": __doc__.strip().split("\n\n", 2)[-1]}

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    (out_dir / f"kernels_{slug}.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"# Fused two-policy head — {summary['device_name']} (torch {torch.__version__})", "",
             f"Headline N={headline[0]}, d={headline[1]}, V={headline[2]} {headline[3]}, fused = `{fused}`: "
             f"forward time ratio {_f(summary['fused_vs_eager_forward_time_ratio'])}, "
             f"forward+backward time ratio {_f(summary['fused_vs_eager_time_ratio'])}, "
             f"peak extra memory ratio {_f(summary['fused_vs_eager_peak_memory_ratio'])} (fused / eager).", "",
             "| N | d | V | dtype | backend | forward | fwd+bwd | peak extra memory |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in rows:
        for b, r in row["backends"].items():
            lines.append(f"| {row['N']} | {row['d']} | {row['V']} | {row['dtype']} | {b} | "
                         f"{_s(r.get('forward_s'), r.get('error'))} | {_s(r.get('fwd_bwd_s'), r.get('error'))} | "
                         f"{fmt_bytes(r.get('peak_extra_bytes', r.get('error', '—')))} |")
    lines += ["", "Times: min over interleaved repetitions after one warm-up. " + summary_note(device), ""]
    (out_dir / f"kernels_{slug}.md").write_text("\n".join(lines))
    print(json.dumps(summary, indent=2))


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def _s(x, err):
    return f"{x * 1e3:.1f} ms" if x is not None else (err or "—")


def summary_note(device):
    if device == "cpu":
        return ("Peak extra memory: RSS high-water mark of a fresh process during one forward+backward minus RSS "
                "before it (gradients included).")
    return "Peak extra memory: torch.cuda.max_memory_allocated() during forward+backward minus allocated before."


if __name__ == "__main__":
    main()
