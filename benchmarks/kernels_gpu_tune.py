"""Tile-shape sweep for the Triton fused head on a CUDA GPU (writes JSON; pick winners into CUDA_CONFIGS).

    python benchmarks/kernels_gpu_tune.py [--n 8192 --d 3584 --v 152064 --dtype bf16] [--out FILE]

Times the forward (kernel + split merge) and the backward (logit-gradient kernel + cuBLAS dh/dW) separately,
each with triton.testing.do_bench, for every candidate (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages).
"""
import argparse
import json

import torch
import triton

from papo_kernels import triton_papo_head as tp

CANDIDATES = [
    (64, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3), (64, 128, 128, 8, 2), (32, 256, 64, 8, 3),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=3584)
    ap.add_argument("--v", type=int, default=152064)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=None, help='JSON list of candidates, e.g. "[[64,256,64,4,3]]"')
    ap.add_argument("--kinds", default="fwd,bwd")
    args = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    n, d, v = args.n, args.d, args.v
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g) / d**0.5 * 2).cuda().to(dt)
    hm = (h.float() + 0.3 * torch.randn(n, d, generator=g).cuda() / d**0.5 * 2).to(dt)
    w = torch.randn(v, d, generator=g).cuda().to(dt)
    y = torch.randint(0, v, (n,), generator=g).cuda()
    g5 = torch.randn(5, n, device="cuda")
    flop = 2 * n * d * v
    results = []
    candidates = [tuple(c) for c in json.loads(args.configs)] if args.configs else CANDIDATES
    for cfg in candidates:
        row = {"config": cfg}
        for kind in args.kinds.split(","):
            key = (kind, True, dt != torch.float32)
            old = tp.CUDA_CONFIGS[key]
            tp.CUDA_CONFIGS[key] = cfg
            try:
                outs, stats = tp.papo_head_forward(h, hm, w, y, 1.0)
                if kind == "fwd":
                    ms = triton.testing.do_bench(lambda: tp.papo_head_forward(h, hm, w, y, 1.0), warmup=5, rep=30)
                    row["fwd_ms"] = ms
                    row["fwd_tflops"] = 2 * flop / ms * 1e-9
                else:
                    st7 = torch.stack([stats[0], stats[1], stats[2], stats[3], outs[2], outs[3], outs[4]]).contiguous()
                    fn = lambda: tp.papo_head_backward(h, hm, w, y, st7, g5, 1.0, True, True, True, True)  # noqa: E731
                    ms = triton.testing.do_bench(fn, warmup=2, rep=20)
                    row["bwd_ms"] = ms
                    row["bwd_tflops"] = 6 * flop / ms * 1e-9
            except Exception as exc:  # noqa: BLE001 — a config that does not compile/fit is a data point
                row[kind + "_error"] = repr(exc)[:200]
            finally:
                tp.CUDA_CONFIGS[key] = old
        print(json.dumps(row), flush=True)
        results.append(row)
    # cuBLAS reference point: one bf16 GEMM of the same size
    ms = triton.testing.do_bench(lambda: h @ w.t(), warmup=3, rep=20)
    summary = {"shape": [n, d, v, args.dtype], "device": torch.cuda.get_device_name(), "cublas_gemm_ms": ms,
               "cublas_tflops": flop / ms * 1e-9, "results": results}
    print(json.dumps({k: summary[k] for k in ("cublas_gemm_ms", "cublas_tflops")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
