"""Stream the trainer's weights out in bounded buckets, for a rollout engine that holds its own copy (vLLM).

`iter_weight_buckets(module, zero_stage, bucket_bytes)` yields lists of `(name, full_tensor)`:

* names are the checkpoint names, i.e. what `save_pretrained` writes for this module (transformers 5 renames
  `model.language_model.*` -> `model.*` and `model.visual.*` -> `visual.*` when saving Qwen2.5-VL), so the engine
  receives exactly the names it reads from a checkpoint directory;
* a bucket holds whole layers (`layer_of`: never q without k/v) and at most `bucket_bytes` of tensors, except
  a single layer larger than that, which comes alone;
* under ZeRO-3 each bucket's parameters are gathered with `deepspeed.zero.GatheredParameters` (collective: every
  rank must drain the generator in the same order), one bucket at a time, never the whole model.

Lifetime: a yielded tensor is a view of the live parameter (ZeRO-3: of the gathered buffer). It is valid until
the consumer asks for the next bucket; under ZeRO-3 the partition is re-released at that point. Consume each
bucket (copy it into the engine) before advancing; never `list(...)` the generator.

Buffers are not pushed: Qwen2.5-VL's only buffers are the rotary `inv_freq` / `original_inv_freq` tensors
(non-persistent, not in checkpoints); vLLM computes its own rotary tables from the config.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .lora import adapted_layers, merged_weight


def checkpoint_names(module: torch.nn.Module) -> dict[str, str]:
    """{parameter name in the module: name `save_pretrained` writes}. Tied parameters appear once (first name),
    as in `named_parameters()` and in the saved file.

    transformers computes the saved names by reverting its load-time conversion mapping; it is run here on
    meta placeholders (no data is touched). Should a conversion ever be more than a renaming (several tensors
    fused into one), the module's own names are used instead: vLLM's Qwen2.5-VL loader maps both spellings.
    """
    names = [n for n, _ in module.named_parameters()]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: module names are the checkpoint names
        return {n: n for n in names}
    placeholders = {n: torch.empty(0, device="meta") for n in names}
    owner = {id(t): n for n, t in placeholders.items()}
    try:
        reverted = revert_weight_conversion(module, dict(placeholders))
    except Exception:  # noqa: BLE001 - any failure: keep the module's names
        return {n: n for n in names}
    out = {}
    for saved, tensor in reverted.items():
        src = owner.get(id(tensor))
        if src is None:  # not a pure renaming
            return {n: n for n in names}
        out[src] = saved
    if len(out) != len(names):
        return {n: n for n in names}
    return out


def _full_nbytes(p: torch.Tensor) -> int:
    """Bytes of the FULL tensor (ZeRO-3 partitions report their full size in `ds_numel`)."""
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return int(numel) * p.element_size()


def layer_of(name: str) -> str:
    """The unit a bucket never splits: the module path up to the first numeric index (a decoder layer
    `...layers.3`, a vision block `...blocks.1`, a merger MLP `...mlp.0`), else the owning module.

    Engines fuse a layer's checkpoint tensors (q/k/v into qkv_proj, gate/up into gate_up_proj) and vLLM-CPU's
    reload processes a layer once all of its tensors arrived: a bucket ending between q and k/v corrupts the
    engine silently (measured on vLLM-CPU 0.32: sync check 0.0)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])


def plan_buckets(module: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Parameters in `named_parameters()` order, packed greedily into buckets of at most `bucket_bytes`, whole
    layers (`layer_of`) only: a layer larger than the limit fills a bucket of its own."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
    layers: list[list[tuple[str, torch.nn.Parameter]]] = []
    for name, p in module.named_parameters():
        if layers and layer_of(layers[-1][-1][0]) == layer_of(name):
            layers[-1].append((name, p))
        else:
            layers.append([(name, p)])
    buckets, current, size = [], [], 0
    for layer in layers:
        nbytes = sum(_full_nbytes(p) for _, p in layer)
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.extend(layer)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_weight_buckets(module: torch.nn.Module, zero_stage: int,
                        bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield `[(checkpoint_name, full_tensor), ...]` per bucket; see the module docstring for the lifetime rule."""
    names = checkpoint_names(module)
    adapted = adapted_layers(module)
    for bucket in plan_buckets(module, bucket_bytes):
        if zero_stage == 3:
            import deepspeed

            params = [p for _, p in bucket]
            # read-only gather (modifier_rank=None): the partitions are not written back on exit
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield _engine_tensors(bucket, names, adapted)
            # leaving the context released the gathered data: the consumer is done with this bucket
        else:
            yield _engine_tensors(bucket, names, adapted)


def _engine_tensors(bucket, names: dict[str, str], adapted: dict) -> list[tuple[str, torch.Tensor]]:
    """The bucket as the engine loads a checkpoint: under LoRA a layer's base weight is sent with its adapter folded
    in (`lora.merged_weight`) under the plain layer's name (…q_proj.weight), the adapters themselves not at all."""
    out = []
    for name, param in bucket:
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, kind = name.split(".base_layer.")
            tensor = merged_weight(adapted[owner]).detach() if kind == "weight" else param.data.detach()
            out.append((names[name].replace(".base_layer.", "."), tensor))
        else:
            out.append((names[name], param.data.detach()))
    return out
