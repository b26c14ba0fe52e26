"""Rollout backends: `native` (our decode loop) and `hf` (HF `generate`) generate with the training module itself,
`vllm` with an engine fed its weights."""
from __future__ import annotations


def build_rollout(cfg, module, tokenizer, world_size: int, *, rank: int | None = None, vllm_module=None):
    """The configured backend. `module` is the trainer's (possibly ZeRO-partitioned) HF model; vLLM does not
    use it (it builds its own engine from cfg.model.path and receives the weights from HybridEngine)."""
    if cfg.rollout.backend == "native":
        from .native import NativeRollout
        return NativeRollout(module, tokenizer, cfg.rollout.batch_size, cuda_graphs=cfg.rollout.cuda_graphs)
    if cfg.rollout.backend == "hf":
        from .hf import HFRollout
        return HFRollout(module, tokenizer, cfg.rollout.batch_size,
                         synced_gpus=world_size > 1 and cfg.deepspeed.zero_stage == 3)
    if cfg.rollout.backend == "vllm":
        from .vllm import VLLMRollout
        if rank is None:
            import torch.distributed as dist
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return VLLMRollout(cfg, tokenizer, rank=rank, vllm_module=vllm_module)
    from ..config import ConfigError
    raise ConfigError(f"rollout.backend={cfg.rollout.backend!r}: must be one of native, hf, vllm")
