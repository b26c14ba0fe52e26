"""Process-group setup that works the same under `python`, `torchrun` and the `deepspeed` launcher.

A plain `python` run gets single-process rendezvous variables so DeepSpeed does not try MPI discovery; on a
machine without CUDA the CPU accelerator and gloo are used.
"""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS: each phase of a CPU step (rollout, old
    log-probs, update) would otherwise page-fault its working set back in after the previous one freed it
    (measured: 5-15% of a tiny-model step). The process keeps its peak heap instead."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value on 64-bit
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def prepare_environment() -> None:
    """Environment defaults that must be in place before deepspeed/triton are imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        keep_freed_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "papo_engine", "torch_extensions"))
    if "RANK" not in os.environ:  # plain `python`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size). `timeout_s`: how long a
    collective waits for the other ranks (trainer.collective_timeout_s; DeepSpeed's default 600 s when None)."""
    prepare_environment()
    import datetime

    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **extra)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce_sum(value: float | torch.Tensor) -> float:
    import torch.distributed as dist
    t = torch.as_tensor(value, dtype=torch.float64, device="cpu" if not torch.cuda.is_available() else device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t)


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a list of numbers, in one collective."""
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if not torch.cuda.is_available() else device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_maxes(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a list of numbers, in one collective."""
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if not torch.cuda.is_available() else device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def global_means(sums_and_counts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: (sum, count) on this rank} -> {name: sum over ranks / count over ranks}."""
    names = sorted(sums_and_counts)
    totals = all_reduce_sums([x for n in names for x in sums_and_counts[n]])
    return {n: totals[2 * i] / max(totals[2 * i + 1], 1e-12) for i, n in enumerate(names)}


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave_together() -> None:
    """Every rank at the same point (the run's end, or an error raised on all ranks at once): wait for the
    others, then close the process group before the interpreter exits. Launchers kill the other ranks as soon
    as one has exited, and a gloo group left to interpreter exit can abort a rank whose peer has already gone
    (`terminate called without an active exception`, exit 250 through the launcher)."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def raise_together(error: Exception | None) -> None:
    """Collective (every rank calls it at the same point): when any rank has an error, every rank raises the
    same `config.ConfigError` (the first such rank's text, naming that rank; printed by rank 0 only), so all
    ranks leave at the same point with one line instead of the others failing in the next collective. With
    one rank: raises `error` if there is one."""
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    if all_reduce_sum(float(error is not None)) == 0:
        return
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    first, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    from .config import ConfigError
    together = ConfigError(f"rank {first} of {len(messages)}: {message}")
    together.main_only = True  # one line for the job
    raise together from error
