"""Fused two-policy head: every backend against a float64 oracle written here from the formulas.

Without CUDA the Triton kernels run in the interpreter, which must be switched on before triton is imported.
"""
import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import papo_kernels  # noqa: E402
from papo_kernels import fused_logprob_entropy, fused_papo_head  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 2e-2
NAMES = ("logprobs", "logprobs_masked", "entropy", "entropy_masked", "kl")


# ------------------------------------------------------------------------------------------------ oracle
def oracle(h, hm, w, y, temperature):
    """Float64 formulas on the (upcast) inputs: log_softmax, −Σ p log p, Σ p (log p − log q)."""
    a = h.double() @ w.double().t() / temperature
    logp = torch.log_softmax(a, -1)
    lp = logp.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if hm is None:
        return lp, ent
    b = hm.double() @ w.double().t() / temperature
    logq = torch.log_softmax(b, -1)
    lq = logq.gather(-1, y[:, None]).squeeze(-1)
    ent_m = -(logq.exp() * logq).sum(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return lp, lq, ent, ent_m, kl


def rel_err(x, ref):
    """max |x − ref| / max |ref| over the tensor."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(n, d, v, dtype, device="cpu", scale=1.0, offset=0.0, masked_noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * scale / d**0.5 * 3
    w = torch.randn(v, d, generator=g)
    if offset:
        # a constant direction shifts every logit by ≈ offset (all logits very negative for offset ≪ 0)
        h[:, 0] = offset / 8.0
        w[:, 0] = 8.0
    hm = h + masked_noise * torch.randn(n, d, generator=g) * scale / d**0.5 * 3
    if offset:
        # dyadic values (multiples of 1/16 and 1/4): every product and partial sum is exact in fp32, so the
        # fp32 logits equal the float64 ones and the check measures the kernels' reductions, not GEMM rounding
        # (which is ~sqrt(d)·ulp(120) ≈ 3e-5 at these magnitudes).
        h, hm, w = (torch.round(h * 16) / 16), (torch.round(hm * 16) / 16), torch.round(w * 4) / 4
        hm[:, 0] = offset / 8.0
    y = torch.randint(0, v, (n,), generator=g)
    return h.to(device, dtype), hm.to(device, dtype), w.to(device, dtype), y.to(device)


# ------------------------------------------------------------------------------------------------ backends
def _cpp_ok():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    from papo_kernels import cpp_backend

    return cpp_backend.is_available()


def _backend_params():
    params = [pytest.param("torch", id="torch")]
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        not _cpp_ok(), reason="C++ backend could not be built (no compiler?)")))
    triton_ok = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not triton_ok, reason="triton needs CUDA or TRITON_INTERPRET=1")))
    return params


BACKENDS = _backend_params()


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ core check
def run_case(backend, n=37, d=48, v=1000, dtype=torch.float32, temperature=1.0, used=NAMES, same=False,
             offset=0.0, masked_noise=0.5, seed=0, tol=None):
    dev = device_for(backend)
    h, hm, w, y = make_inputs(n, d, v, dtype, dev, offset=offset, masked_noise=masked_noise, seed=seed)
    if same:
        hm = h.clone()
    tol = tol if tol is not None else (BF16_TOL if dtype in (torch.bfloat16, torch.float16) else FP32_TOL)

    h.requires_grad_(), hm.requires_grad_(), w.requires_grad_()
    out = fused_papo_head(h, hm, w, y, temperature=temperature, backend=backend)
    assert isinstance(out, papo_kernels.PapoHeadOutput)
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in NAMES:
        assert getattr(out, name).shape == (n,) and getattr(out, name).dtype == expect_dtype, name

    h64, hm64, w64 = (t.detach().double().requires_grad_() for t in (h, hm, w))
    ref = oracle(h64, hm64, w64, y, temperature)
    for name, o, r in zip(NAMES, out, ref):
        if same and name == "kl":
            assert o.abs().max().item() <= 1e-6, f"KL of identical branches: {o.abs().max().item()}"
            continue
        assert torch.isfinite(o).all(), name
        e = rel_err(o.detach(), r.detach())
        assert e <= tol, f"{backend} {name}: rel err {e:.2e} > {tol:.0e}"

    # different random upstream gradient per row and per output; unused outputs get no gradient at all
    g = torch.Generator().manual_seed(seed + 1)
    grads = {k: torch.randn(n, generator=g, dtype=torch.float64).to(dev) for k in NAMES}
    idx = [NAMES.index(k) for k in used]
    loss = sum((out[i].double() * grads[NAMES[i]]).sum() for i in idx)
    got = torch.autograd.grad(loss, (h, hm, w), allow_unused=True)
    ref_loss = sum((ref[i] * grads[NAMES[i]]).sum() for i in idx)
    want = torch.autograd.grad(ref_loss, (h64, hm64, w64), allow_unused=True)
    for name, gt, wt in zip(("d_hidden", "d_hidden_masked", "d_weight"), got, want):
        if wt is None or wt.abs().max() == 0:
            assert gt is None or gt.abs().max() == 0, name
            continue
        assert gt is not None and gt.dtype == dtype and gt.shape == wt.shape, name
        e = rel_err(gt.detach(), wt)
        assert e <= tol, f"{backend} {name} (outputs used: {used}): rel err {e:.2e} > {tol:.0e}"
    return out


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [1000, 1001])
def test_all_outputs_fp32(backend, v):
    run_case(backend, v=v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_odd_vocab(backend):
    run_case(backend, v=777, temperature=0.7, seed=3)
    run_case(backend, v=1000, temperature=1.6, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_negative_logits(backend):
    # every logit ≈ −120 (all in [−135, −105]): e^logit underflows to 0 in fp32, so a running max started at 0
    # gives log 0, and a tail tile loaded as logit 0 would dominate the sum.
    out = run_case(backend, offset=-120.0, seed=5)
    a = make_inputs(37, 48, 1000, torch.float64, offset=-120.0, seed=5)
    logits = a[0] @ a[2].t()
    assert logits.max() < -104 and logits.min() > -140
    assert (out.logprobs <= 0).all() and (out.logprobs_masked <= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", [("logprobs",), ("entropy_masked",), ("kl",), ("logprobs", "kl"),
                                  ("logprobs_masked", "entropy")])
def test_only_some_outputs_used(backend, used):
    run_case(backend, used=used, seed=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_branches_zero_kl(backend):
    run_case(backend, same=True, seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    run_case(backend, dtype=torch.bfloat16, seed=8)


def test_float64_torch_backend():
    out = run_case("torch", dtype=torch.float64, tol=1e-10, seed=9)
    assert out.kl.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_policy(backend):
    dev = device_for(backend)
    h, _, w, y = make_inputs(29, 48, 1001, torch.float32, dev, seed=10)
    h.requires_grad_(), w.requires_grad_()
    out = fused_logprob_entropy(h, w, y, temperature=0.9, backend=backend)
    assert isinstance(out, papo_kernels.LogprobEntropyOutput)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref = oracle(h64, None, w64, y, 0.9)
    for o, r in zip(out, ref):
        assert rel_err(o.detach(), r.detach()) <= FP32_TOL
    g = torch.Generator().manual_seed(11)
    g_lp, g_h = torch.randn(29, generator=g).to(dev), torch.randn(29, generator=g).to(dev)
    got = torch.autograd.grad((out.logprobs * g_lp).sum() + (out.entropy * g_h).sum(), (h, w))
    want = torch.autograd.grad((ref[0] * g_lp.double()).sum() + (ref[1] * g_h.double()).sum(), (h64, w64))
    for gt, wt in zip(got, want):
        assert rel_err(gt.detach(), wt) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_detached_masked_branch_gives_the_single_policy_head(backend):
    """On-policy reuse without masked gradient (papo_engine/old_policy.py): the update's head call takes the masked
    branch's hidden states detached and the loss reads only the original branch's log-probs and entropy. Those
    outputs and their gradients are the single-policy head's — bit for bit on the CPU backends, where the same
    code runs once the masked branch (not recomputed in backward) is left out."""
    dev = device_for(backend)
    h, hm, w, y = make_inputs(29, 48, 1001, torch.float32, dev, seed=16)
    h.requires_grad_(), w.requires_grad_()
    both = fused_papo_head(h, hm, w, y, temperature=0.9, backend=backend)
    single = fused_logprob_entropy(h, w, y, temperature=0.9, backend=backend)
    g = torch.Generator().manual_seed(17)
    g_lp, g_h = torch.randn(29, generator=g).to(dev), torch.randn(29, generator=g).to(dev)
    got = torch.autograd.grad((both.logprobs * g_lp).sum() + (both.entropy * g_h).sum(), (h, w))
    want = torch.autograd.grad((single.logprobs * g_lp).sum() + (single.entropy * g_h).sum(), (h, w))
    tol = 0.0 if dev == "cpu" else FP32_TOL
    for x, ref in [(both.logprobs, single.logprobs), (both.entropy, single.entropy), *zip(got, want)]:
        assert rel_err(x.detach(), ref.detach().double()) <= tol


@pytest.mark.skipif(not _cpp_ok(), reason="C++ backend could not be built (no compiler?)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_many_tiles(dtype, monkeypatch):
    """Several token chunks and ragged vocab blocks (block_v = 300 does not divide V = 1001)."""
    from papo_kernels import cpp_backend

    orig = cpp_backend.papo_head_cpp
    monkeypatch.setattr(cpp_backend, "papo_head_cpp",
                        lambda h, hm, w, y, t=1.0: orig(h, hm, w, y, t, block_v=300, chunk_n=8))
    run_case("cpp", v=1001, dtype=dtype, temperature=1.3, seed=13)


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="interpreter-only variant of the chunked triton backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_token_chunks(dtype, monkeypatch):
    """The triton backward in several token chunks (fp32 dW accumulation across chunks for bf16)."""
    from papo_kernels import triton_papo_head

    monkeypatch.setattr(triton_papo_head, "_BWD_BUFFER_BYTES", 2 * 1000 * 4 * 16)
    run_case("triton", v=1000, dtype=dtype, seed=14)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(256, 256), (1024, 3584)])
def test_triton_cuda_qwen_vocab(n, d, dtype):
    """V = 152064 (Qwen2.5-VL; 152064 mod 1024 = 512, the tail tile that broke a public kernel), compiled."""
    run_case("triton", n=n, d=d, v=152064, dtype=dtype, temperature=0.9, seed=12)


@cuda
def test_triton_cuda_many_backward_chunks(monkeypatch):
    from papo_kernels import triton_papo_head

    monkeypatch.setattr(triton_papo_head, "_BWD_BUFFER_BYTES", 2 * 32001 * 2 * 128)
    run_case("triton", n=1000, d=512, v=32001, dtype=torch.bfloat16, seed=15)


@pytest.mark.skipif(not _cpp_ok(), reason="C++ backend could not be built (no compiler?)")
def test_cpp_rejects_out_of_range_targets():
    h, hm, w, y = make_inputs(4, 8, 16, torch.float32)
    y[2] = 16
    with pytest.raises(ValueError, match="targets must lie in"):
        fused_papo_head(h, hm, w, y, backend="cpp")


def test_torch_chunks_agree_with_reference():
    h, hm, w, y = make_inputs(37, 48, 1000, torch.float64)
    a = papo_kernels.reference.papo_head_chunked(h, hm, w, y, 0.8, chunk_size=5)
    b = papo_kernels.papo_head_reference(h, hm, w, y, 0.8)
    for x, r in zip(a, b):
        assert rel_err(x, r) <= 1e-12


def test_bad_backend_name():
    h, hm, w, y = make_inputs(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'cpp'"):
        fused_papo_head(h, hm, w, y, backend="cuda")
    with pytest.raises(ValueError, match="allowed values"):
        fused_logprob_entropy(h, w, y, backend="")


def test_auto_backend_on_cpu():
    assert papo_kernels.resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")
    assert papo_kernels.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_does_not_shadow_pypi_kernels(tmp_path):
    """Installed as ``papo_kernels``: transformers must not mistake our folder for the PyPI ``kernels`` package.

    Checked in a fresh interpreter started outside the repository (a Python started *in* the repo root puts
    the root on sys.path, where the folder ``kernels/`` is importable by its folder name).
    """
    import subprocess
    import sys

    code = (
        "import papo_kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'transformers sees a kernels package'\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:\n"
        "    print('ok')\n"
        "else:\n"
        "    raise SystemExit('import kernels succeeded: ' + str(kernels.__file__))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_missing_compiler_clear_error_and_auto_fallback(tmp_path):
    """Without a C++ compiler: backend="cpp" raises one clear message; "auto" warns once and uses chunked torch."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import warnings, torch, papo_kernels
        g = torch.Generator().manual_seed(0)
        h, hm, w = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
        y = torch.randint(0, 30, (5,), generator=g)
        try:
            papo_kernels.fused_papo_head(h, hm, w, y, backend="cpp")
            print("NO ERROR")
        except RuntimeError as err:
            print("ERROR:", err)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = papo_kernels.fused_papo_head(h, hm, w, y, backend="auto")
            papo_kernels.fused_papo_head(h, hm, w, y, backend="auto")
        ref = papo_kernels.papo_head_reference(h, hm, w, y)
        print("WARNINGS:", len(caught), caught[0].message if caught else "")
        print("MATCH:", all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref)))
    """)
    env = dict(os.environ, CXX="/no/such/compiler", TORCH_EXTENSIONS_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert "no C++ compiler found" in lines["ERROR"] and "/no/such/compiler" in lines["ERROR"]
    assert lines["WARNINGS"].strip().startswith("1 ") and "falling back" in lines["WARNINGS"]
    assert lines["MATCH"].strip() == "True"
