"""`papo export`: a training checkpoint (any ZeRO stage, any number of ranks) → a Hugging Face model directory
(weights + config + tokenizer + image-processor config) that `from_pretrained` and vLLM load.

ZeRO-3 checkpoints hold one parameter shard per rank; DeepSpeed's `zero_to_fp32` stitches the fp32 master
shards back together offline (no process group, no GPU). Stages 0–2 keep whole module weights in the
model-states file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from .checkpoint import COMPLETE, DEEPSPEED_TAG, STEP_DIR, complete_checkpoints, verify_checkpoint
from .config import ConfigError
from .models import DTYPES


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    ds_dir = checkpoint / "deepspeed"
    dtype = DTYPES[saved["model"]["dtype"]]
    if saved["deepspeed"]["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG)
    else:
        state = torch.load(ds_dir / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def check_export_paths(checkpoint: Path, out_dir: Path) -> None:
    """One line before anything is read or written: the checkpoint is missing (named as such, with what the run
    folder still holds), not a checkpoint, or the target is a file, inside the checkpoint or not empty (export
    never replaces or deletes files, e.g. a run's checkpoint-final)."""
    if not checkpoint.exists():
        kept = complete_checkpoints(checkpoint.parent.parent) if STEP_DIR.match(checkpoint.name) else []
        why = (f"; the run keeps only its newest trainer.keep_last checkpoints: {', '.join(p.name for p in kept)} "
               f"in {checkpoint.parent}" if kept else "")
        raise ConfigError(f"papo export: {checkpoint} does not exist{why}")
    if not (checkpoint / COMPLETE).is_file():
        raise ConfigError(f"papo export: {checkpoint} is not a complete training checkpoint (no {COMPLETE} file; "
                          f"expected <output_dir>/checkpoints/step-NNNNNN)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"papo export: {out_dir} is a file; give a folder to write the model into")
    if out_dir.resolve().is_relative_to(checkpoint.resolve()):
        raise ConfigError(f"papo export: {out_dir} is within the checkpoint {checkpoint}; give a folder outside it")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries:
        raise ConfigError(f"papo export: {out_dir} is not empty ({len(entries)} entries: {', '.join(entries[:3])}"
                          f"{', ...' if len(entries) > 3 else ''}); give a new or empty folder (nothing is replaced)")


def export_checkpoint(checkpoint: Path, out_dir: Path, merged: bool = False) -> Path:
    """The model of the checkpoint's family (its hf/config.json model_type), saved with `save_pretrained`: the
    folder loads with that family's `from_pretrained` (Qwen2_5_VL…, Qwen3VL…, Qwen3_5ForConditionalGeneration).
    A LoRA run's checkpoint gives a PEFT adapter folder on the run's base, or with `merged` the model with the
    adapters folded in."""
    from .families import checkpoint_model_type, family_named
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_export_paths(checkpoint, out_dir)
    try:
        verify_checkpoint(checkpoint)
    except ConfigError as err:
        raise ConfigError(f"papo export: {err}") from None
    try:
        state = consolidated_state_dict(checkpoint)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"papo export: {checkpoint}: its model state cannot be read ({why})") from None
    family = family_named(checkpoint_model_type(checkpoint / "hf"), f"papo export: {checkpoint}")
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if saved["model"].get("lora", {}).get("rank", 0) > 0:
        _export_adapters(checkpoint, out_dir, state, saved, family, merged)
    else:
        if merged:
            raise ConfigError(f"papo export --merged: {checkpoint} is not a LoRA run's (model.lora.rank=0): it "
                              f"exports the whole model without --merged")
        config = family.config_class.from_pretrained(checkpoint / "hf")
        with torch.device("meta"):
            expected = set(family.model_class(config).state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ConfigError(f"papo export: {checkpoint} does not match its config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        save_model_folder(family, config, state, out_dir)
    for item in (checkpoint / "hf").iterdir():  # tokenizer and image-processor files
        if item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def save_model_folder(family, config, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """`state` (module names) as the family's Hugging Face folder, through a model built on the meta device."""
    with torch.device("meta"):
        model = family.model_class(config)
    model.load_state_dict(state, assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)


def _export_adapters(checkpoint: Path, out_dir: Path, state: dict, saved: dict, family, merged: bool) -> None:
    """A LoRA checkpoint (its adapters alone): the PEFT adapter folder, or the base with them folded in."""
    from . import lora
    from .config import ModelConfig
    settings = lora.settings_of(saved)
    base = lora.base_dir(ModelConfig(path=saved["model"]["path"]), saved["warmup"]["steps"], checkpoint.parent.parent)
    if not (base / "config.json").is_file():
        raise ConfigError(f"papo export: the LoRA base model {base} of {checkpoint} is missing")
    adapters = {name: tensor for name, tensor in state.items() if ".lora_" in name}
    if not adapters or len(adapters) != len(state):
        raise ConfigError(f"papo export: {checkpoint} does not hold a LoRA run's adapters alone "
                          f"({len(adapters)} adapter tensors of {len(state)})")
    if not merged:
        lora.write_adapter(out_dir, lora.adapter_state_dict(adapters), settings, lora.target_pattern(settings), base)
        return
    model = family.model_class.from_pretrained(base, dtype=DTYPES[saved["model"]["dtype"]])
    state = model.state_dict()
    suffix = f".lora_A.{lora.ADAPTER}.weight"
    for owner in (name.removesuffix(suffix) for name in adapters if name.endswith(suffix)):
        state[f"{owner}.weight"] = lora.fold(state[f"{owner}.weight"], adapters[owner + suffix],
                                             adapters[f"{owner}.lora_B.{lora.ADAPTER}.weight"],
                                             settings.alpha / settings.rank)
    save_model_folder(family, model.config, state, out_dir)
