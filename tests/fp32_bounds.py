"""How far two runs that differ only in batch shapes (so a GEMM may block differently) may drift apart over a few
real fp32 steps — shared by the on-policy-reuse checks on one and on two ranks. The same run within these bounds
came out identical on an AVX-512 CPU and a few fp32 ulps apart on an AVX2 one (ATEN_CPU_CAPABILITY=avx2).

A metric: |x − y| ≤ METRIC_ATOL + METRIC_RTOL·max(|x|, |y|); the absolute part is for sums that are ~0 by
construction (pg_loss at ratio 1, a mismatch of made-up rollout log-probs, one sequence's small KL). A parameter:
no entry apart by PARAM_MAX_IN_LR Adam steps (Adam turns the rounding of a ~0 gradient into an O(lr) move), and
the mean entry not by PARAM_MEAN_IN_LR (a real difference in the loss moves every entry: a 1% change of γ came out
18× and 340× the two bounds). Worst seen on AVX2: 5e-8 absolute on a mean metric, 8e-7 on one sequence's
perception KL (the perception_reliance histogram, two ZeRO-3 ranks); 0.035 lr (max) and 1e-4 lr (mean) on a
parameter."""
import torch

METRIC_RTOL, METRIC_ATOL = 1e-5, 5e-6
PARAM_MAX_IN_LR, PARAM_MEAN_IN_LR = 0.25, 2e-3


def run_differences(rows_a: list[dict], params_a: dict[str, torch.Tensor], rows_b: list[dict],
                    params_b: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
    """Per metric of each step and per parameter tensor: the difference as a fraction of its bound (≤ 1 passes);
    non-numeric metrics must be equal."""
    out = {}

    def compare(name: str, x, y) -> None:  # a number, or a list / dict of them (perception_reliance's histogram)
        if isinstance(x, dict):
            assert x.keys() == y.keys(), name
            for k in x:
                compare(f"{name}.{k}", x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), name
            for i, (xi, yi) in enumerate(zip(x, y)):
                compare(f"{name}[{i}]", xi, yi)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out[name] = abs(x - y) / (METRIC_ATOL + METRIC_RTOL * max(abs(x), abs(y)))
        else:
            assert x == y, name

    for step, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
        assert ra.keys() == rb.keys()
        for k in ra:
            compare(f"step {step}: {k}", ra[k], rb[k])
    for n, x in params_a.items():
        apart = (x - params_b[n]).abs()
        out[f"param {n} (max)"] = float(apart.max()) / (PARAM_MAX_IN_LR * lr)
        out[f"param {n} (mean)"] = float(apart.mean()) / (PARAM_MEAN_IN_LR * lr)
    return out


def assert_within_bounds(differences: dict[str, float], label: str, skip: str = "update/ppo_kl") -> None:
    """The worst difference (metrics ending in `skip` aside) within its bound, printed either way."""
    worst = max((v, k) for k, v in differences.items() if not k.endswith(skip))
    print(f"{label}: worst difference {worst[0]:.2e} of its bound ({worst[1]})")
    assert worst[0] <= 1, worst
