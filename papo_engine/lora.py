"""LoRA (`model.lora.rank > 0`): peft's adapters injected into the policy in place, everything else frozen.

* `apply_lora(model, settings)` puts a `peft` LoRA layer on every linear layer of the language model named in
  `target_modules` (and of the vision tower named in `vision_target_modules`) with peft's `inject_adapter_in_model`:
  the module tree keeps its names and classes (no PeftModel wrapper), so the actor, the fused head, the rollout
  backends and ZeRO see the same model; only the adapters require gradients. The lm_head is never adapted.
* The reference policy is the same module with its adapters switched off (`AdaptersOff`): no second copy.
* Readers of raw weights (the native decode step, the vLLM push, `--merged` exports) take `merged_weight(layer)`
  = W + (alpha / r)·B·A, computed out of place: the trained base weights are never modified (peft's in-place
  merge/unmerge would drift them by rounding every step).
* Checkpoints hold the adapters and their optimizer state only; the base they adapt lies in `base_dir(...)`: the
  model.path checkpoint, or `<output_dir>/lora-base`, written once per run where the base is not on disk (a model
  built from a config, or changed by the warm-up). A PEFT adapter folder (`write_adapter`) loads with
  `PeftModel.from_pretrained(base, folder)`.
"""
from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .config import ConfigError, LoraSettings

ADAPTER = "default"                  # peft's adapter name; the saved PEFT format leaves it out of the keys
# adapters go on the linear layers of the decoder layers and of the vision blocks (not on the vision tower's patch
# embedding, a convolution, nor on its merger or the lm_head)
LANGUAGE_PREFIX = "model.language_model.layers."
VISION_PREFIX = "model.visual.blocks."
BASE_FOLDER = "lora-base"


def enabled(settings: LoraSettings) -> bool:
    return settings.rank > 0


def _linear_names(model, prefix: str) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if name.startswith(prefix) and type(module) is torch.nn.Linear}


def check_targets(model, settings: LoraSettings) -> None:
    """One line for a target name that matches no linear layer of its part of the model, or a rank above a targeted
    layer's width (nothing to check with LoRA off)."""
    if not enabled(settings):
        return
    for key, prefix, names in (("target_modules", LANGUAGE_PREFIX, settings.target_modules),
                               ("vision_target_modules", VISION_PREFIX, settings.vision_target_modules)):
        layers = _linear_names(model, prefix)
        leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
        for target in names:
            matched = [name for name in layers if name.rsplit(".", 1)[-1] == target]
            if not matched:
                raise ConfigError(f"model.lora.{key}: {target!r} matches no linear layer under {prefix.rstrip('.')} "
                                  f"(its linear layers: {', '.join(leaves)})")
            for name in matched:
                width = min(layers[name].in_features, layers[name].out_features)
                if settings.rank > width:
                    raise ConfigError(f"model.lora.rank={settings.rank}: larger than {name}'s width {width} "
                                      f"({layers[name].in_features} -> {layers[name].out_features}); use a rank "
                                      f"<= {width} or leave {target!r} out of model.lora.{key}")


def target_pattern(settings: LoraSettings) -> str:
    """The regex (peft's full-match form over module names) selecting the adapted layers."""
    parts = []
    for key, prefix, names in (("target_modules", LANGUAGE_PREFIX, settings.target_modules),
                               ("vision_target_modules", VISION_PREFIX, settings.vision_target_modules)):
        if not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names):
            raise ConfigError(f"model.lora.{key}={names!r}: must be names of linear layers (e.g. q_proj)")
        if names:
            parts.append(re.escape(prefix) + r"\d+\.(?:.*\.)?(" + "|".join(names) + ")")
    if not parts:
        raise ConfigError("model.lora.rank > 0 with no target: set model.lora.target_modules or "
                          "model.lora.vision_target_modules")
    return "|".join(f"(?:{p})" for p in parts)


def peft_config(settings: LoraSettings, pattern: str, base_path: str | None = None):
    from peft import LoraConfig
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=pattern, bias="none", base_model_name_or_path=base_path)


class LoraRecord:
    """What the savers need of a LoRA policy (kept on the module as `lora_record`)."""

    def __init__(self, settings: LoraSettings, base: Path):
        self.settings, self.base = settings, Path(base)
        self.pattern = target_pattern(settings)
        self.scaling = settings.alpha / settings.rank


def apply_lora(model, settings: LoraSettings, base: Path) -> torch.nn.Module:
    """Adapters on the targeted layers (B = 0: the adapted model starts equal to the base), every other parameter
    frozen; `base` is where the base lies (`base_dir`). Returns `model`, changed in place."""
    from peft import inject_adapter_in_model
    record = LoraRecord(settings, base)
    check_targets(model, settings)
    model.requires_grad_(False)
    inject_adapter_in_model(peft_config(settings, record.pattern), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    model.lora_record = record
    return model


def start_adapters(model, cfg, base: Path, writer: bool, tokenizer, image_processor) -> AdaptersOff:
    """A run's LoRA start: the base written where it is not on disk yet (by `writer`, rank 0 of a new start, before
    the adapters exist), then the adapters injected. Returns the reference (the base: adapters off)."""
    if writer and writes_base(cfg.model, cfg.warmup.steps):
        write_base(model, base, tokenizer, image_processor)
    apply_lora(model, cfg.model.lora, base)
    return AdaptersOff(model)


def adapted_layers(model) -> dict[str, torch.nn.Module]:
    """{module path: peft LoRA layer}."""
    from peft.tuners.lora import LoraLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def fold(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling·B·A, computed in float32, in W's dtype: a new tensor (W is not modified)."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scaling).to(weight.dtype)


def merged_weight(layer) -> torch.Tensor:
    """A linear layer's effective weight: its adapter folded in (`fold`) for an active LoRA layer, else the layer's
    own weight (the parameter itself)."""
    from peft.tuners.lora import LoraLayer
    if not isinstance(layer, LoraLayer) or layer.disable_adapters:
        return layer.weight
    return fold(layer.base_layer.weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                layer.scaling[ADAPTER])


@contextmanager
def adapters_off(model):
    """The base model for the block: every LoRA layer computes its base layer alone (peft's own switch,
    `disable_adapters`, set directly: `enable_adapters(False)` would also clear the adapters' requires_grad)."""
    layers = list(adapted_layers(model).values())
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer._disable_adapters = state


class AdaptersOff:
    """The reference policy under LoRA: the policy's module with its adapters off (`reference_model`)."""

    def __init__(self, module):
        self.module = module


def reference_model(reference):
    """(the module the reference's forward runs on, the context it runs in): a frozen copy as it is, or the
    policy with its adapters off."""
    if isinstance(reference, AdaptersOff):
        return reference.module, adapters_off(reference.module)
    return reference, nullcontext()


# ----------------------------------------------------------------------------------------------------------
# saving and loading


def writes_base(model_cfg, warmup_steps: int) -> bool:
    """Whether the run writes its base: not when it starts from model.path unchanged."""
    return not (model_cfg.path and warmup_steps == 0)


def base_dir(model_cfg, warmup_steps: int, run_dir: Path) -> Path:
    """Where the base a run's adapters apply to lies: model.path when the run starts from it unchanged, else
    <run folder>/lora-base (a model built from a config, or one the warm-up changed)."""
    return Path(run_dir) / BASE_FOLDER if writes_base(model_cfg, warmup_steps) else Path(model_cfg.path)


def run_base(cfg, run_dir: Path, resuming: bool):
    """(the LoRA base folder or None without LoRA, the model config to load the policy with): a resumed LoRA run
    loads its base from the folder its first start wrote (or model.path) — the warm-up is in it — not again."""
    if not enabled(cfg.model.lora):
        return None, cfg.model
    base = base_dir(cfg.model, cfg.warmup.steps, run_dir)
    if not resuming:
        return base, cfg.model
    import dataclasses
    if not (base / "config.json").is_file():
        raise ConfigError(f"--resume: the LoRA base model {base} is missing (the run's first start wrote it; the "
                          f"checkpoints hold only the adapters); start a new trainer.output_dir")
    return base, dataclasses.replace(cfg.model, path=str(base))


def write_base(model, path: Path, tokenizer, image_processor) -> None:
    """The base model as a Hugging Face folder (before the adapters are injected), written atomically: a folder
    named `path` is always complete."""
    import shutil
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)  # a restarted run's (no checkpoint refers to it)
    tmp.replace(path)


def peft_key(name: str) -> str:
    """A module parameter name -> the key PEFT saves: under base_model.model., without the adapter name."""
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")


def adapter_state_dict(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} of the adapter parameters among `named` (module parameter names)."""
    return {peft_key(n): t.detach().cpu().contiguous() for n, t in named.items() if ".lora_" in n}


def write_adapter(path: Path, adapters: dict[str, torch.Tensor], settings: LoraSettings, pattern: str,
                  base_path: Path | str) -> None:
    """A PEFT adapter folder: adapter_config.json + adapter_model.safetensors (keys from `adapter_state_dict`)."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    peft_config(settings, pattern, str(Path(base_path).resolve())).save_pretrained(str(path))
    save_file(adapters, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A module state dict with LoRA layers (…q_proj.base_layer.weight, …q_proj.lora_A.default.weight, …) -> the
    plain model's (…q_proj.weight = W + scaling·B·A), adapters folded in, computed in float32."""
    out = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, kind = name.split(".base_layer.")
            if kind == "weight":
                tensor = fold(tensor, state[f"{owner}.lora_A.{ADAPTER}.weight"],
                              state[f"{owner}.lora_B.{ADAPTER}.weight"], scaling)
            name = f"{owner}.{kind}"
        out[name] = tensor
    return out


def settings_of(saved_config: dict) -> LoraSettings:
    return LoraSettings(**saved_config["model"].get("lora", {}))

