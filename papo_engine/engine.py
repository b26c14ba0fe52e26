"""The DeepSpeed training engine: ZeRO stage from config, AdamW, gradient clipping, explicit accumulation.

The loss arriving here is already normalized by the GLOBAL number of response tokens, so gradients are
summed over micro-batches (`scale_wrt_gas=False`) and the accumulation boundary is set by the caller:
results do not depend on the number of ranks or micro-batches.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import distributed as dist_utils
from .config import Config, ConfigError


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": 1,  # boundaries are set explicitly per step
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds["train_batch_size"] = cfg.trainer.micro_batch_size * world_size
    if cfg.model.dtype == "bfloat16":
        # check_grad_overflow: ZeRO-1/2 then skip a step whose gradients are non-finite (fp32 does by default)
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


def frozen_reference(model, cfg: Config, world_size: int):
    """A frozen copy of `model` for the reference KL; under ZeRO-3 it is partitioned like the policy."""
    import copy
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.deepspeed.zero_stage != 3:
        return reference
    import deepspeed
    config = deepspeed_config(cfg, world_size)
    config.pop("gradient_clipping")
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    return engine.module


class TrainingEngine:
    """Owns the DeepSpeed engine; `module` is the (possibly ZeRO-partitioned) HF model."""

    def __init__(self, model, cfg: Config, world_size: int):
        import deepspeed

        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        adam = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                    weight_decay=cfg.optim.weight_decay)
        if cfg.deepspeed.offload_optimizer:  # optimizer states live on the CPU: DeepSpeed's vectorized CPU AdamW
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **adam)
        elif cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_states_during_rollout:
            # ZeRO-3's offload_states() asserts DeepSpeed's FusedAdam (deepspeed 0.19.8 stage3.py); it is AdamW
            # with adam_w_mode, JIT-built on first use (CUDA kernels on GPU, a C++ implementation on CPU)
            from deepspeed.ops.adam import FusedAdam
            optimizer = FusedAdam(params, adam_w_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(params, **adam)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
        self.zero_stage = cfg.deepspeed.zero_stage
        self.adapters_only = hasattr(model, "lora_record")  # LoRA: checkpoints hold the trained adapters alone
        self.parameter_count = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        self.nonfinite_after_step = 0  # values an applied optimizer step made NaN/inf (finite loss and gradients)

    @property
    def module(self):
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_micro_batch(self) -> None:
        """Call before each training forward. The trainer calls the HF module directly (to reach the hidden states
        without logits), so it must do what DeepSpeed's own forward does first: tell the ZeRO optimizer a new
        micro-step starts — ZeRO-3 otherwise overwrites, instead of accumulating, the previous micro-batch's
        gradient partitions."""
        if self.zero_stage > 0:
            self.engine.optimizer.clear_backward_seen_flag()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        """Optimizer step (clipping inside DeepSpeed) unless the gradients are non-finite on any rank.

        Returns (pre-clip global gradient norm, whether the step was applied). A skipped step changes neither
        parameters nor optimizer state: its gradients are discarded. An applied step with finite gradients can
        still overflow the parameters (an lr near the dtype's range); that cannot be undone without a copy of
        every parameter and optimizer state, so it is recorded in `nonfinite_after_step` for the trainer to stop
        on before anything saves those weights.
        """
        norm, applied = self._step()
        if applied and not self.nonfinite_after_step:
            self.nonfinite_after_step = self.nonfinite_parameters()
        return norm, applied

    def nonfinite_parameters(self) -> int:
        """Trainable parameter values that are NaN or inf (under ZeRO-3 each rank checks its partitions, summed)."""
        tensors = [p.ds_tensor if self.zero_stage == 3 else p for p in self.module.parameters() if p.requires_grad]
        local = float(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum()) if tensors else 0.0
        return int(dist_utils.all_reduce_sum(local)) if self.zero_stage == 3 else int(local)

    def require_finite_parameters(self, source: str) -> None:
        """Before the first step: weights that are already NaN/inf (an earlier run's, or the warm-up's) are refused."""
        bad = self.nonfinite_parameters()
        if bad:
            err = ConfigError(f"{source}: {bad:,} of {self.parameter_count:,} parameter values are NaN or inf; "
                              f"training cannot start from them")
            err.main_only = True  # the same on every rank: one line for the job
            raise err

    def _step(self) -> tuple[float, bool]:
        if self.zero_stage == 0:  # DeepSpeed checks nothing for a plain torch optimizer: do it here
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                self.engine.zero_grad()
                return norm, False
            self.engine.step()
            return norm, True
        if self.zero_stage == 3 and self._zero3_grads_nonfinite():
            # ZeRO-3 checks for overflow only under fp16; discard the reduced gradient partitions ourselves
            self.engine.optimizer._overflow_clean_up(self.engine.optimizer.loss_scale)
            return float("nan"), False
        # ZeRO-1/2 skip a non-finite step themselves (fp32 always, bf16 with check_grad_overflow) and report it
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, not getattr(self.engine.optimizer, "overflow", False)

    def _zero3_grads_nonfinite(self) -> bool:
        # this rank's reduced gradient partitions, accumulated over the micro-batches: one flat buffer, filled
        # with or without offload_optimizer (`averaged_gradients` stays empty when the optimizer is offloaded)
        partitions = self.engine.optimizer.grad_partitions_flat_buffer
        local = not bool(torch.isfinite(partitions).all())
        return dist_utils.all_reduce_sum(float(local)) > 0

    def full_state_dict(self) -> dict | None:
        """Full weights on rank 0 (gathered from ZeRO-3 partitions when needed); None on other ranks."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        import torch.distributed as dist
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save_pretrained(self, path: Path, tokenizer, image_processor) -> None:
        """A Hugging Face model directory (weights + config + tokenizer + processor config) on rank 0; under LoRA
        the model with its adapters folded in, and the PEFT adapter folder in `path / "adapter"`."""
        import torch.distributed as dist
        state = self.full_state_dict()
        if dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
            if self.adapters_only:
                from . import lora
                from .export import save_model_folder
                from .families import family_of
                record = self.module.lora_record
                save_model_folder(family_of(self.module), self.module.config,
                                  lora.merge_state_dict(state, record.scaling), path)
                lora.write_adapter(path / "adapter", lora.adapter_state_dict(state), record.settings, record.pattern,
                                   record.base)
                tokenizer.save_pretrained(path / "adapter")
                image_processor.save_pretrained(path / "adapter")
            else:
                self.module.save_pretrained(path, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(path)
            image_processor.save_pretrained(path)
        dist.barrier()
