"""The model families the engine trains, one file each, found by config.json's `model_type` (a checkpoint) or by
`model.architecture` (a model built from a config). A fourth family is one new file and one line in FAMILIES.

Everything that differs between families — configs of built models, the image processor's patch grid, the chat
template, the prompt cache of the shared-prompt forward, what the native decode step must do — is asked of the
family object (`base.ModelFamily`); no other module tests `model_type`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, ModelConfig
from . import qwen2_5_vl, qwen3_5, qwen3_vl
from .base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    qwen3_5.FAMILY,
)}


def architecture_names() -> list[str]:
    """Every `model.architecture` a family builds."""
    return [name for family in FAMILIES.values() for name in family.architectures]


def family_of(model) -> ModelFamily:
    """The family of a loaded model."""
    return FAMILIES[model.config.model_type]


def family_named(model_type: str, where: str) -> ModelFamily:
    """The family of `model_type`; one line naming it and the supported ones when there is none."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{t} ({f.label})" for t, f in FAMILIES.items())
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported (supported: {supported})")
    return FAMILIES[model_type]


def checkpoint_model_type(path: str | Path) -> str:
    """config.json's model_type in a checkpoint folder (read without transformers)."""
    config = Path(path) / "config.json"
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.path={str(path)!r}: no config.json there (expected a Hugging Face model directory: "
                          f"config.json, tokenizer.json, weights)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config}: not valid JSON ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(content, dict) or not isinstance(content.get("model_type"), str):
        raise ConfigError(f"{config}: no model_type (a Hugging Face config.json names its model type)")
    return content["model_type"]


def family_for(mcfg: ModelConfig) -> ModelFamily:
    """The family of the configured model: the checkpoint's model_type, or the family that builds
    model.architecture."""
    if mcfg.path:
        return family_named(checkpoint_model_type(mcfg.path), f"model.path={mcfg.path!r}")
    for family in FAMILIES.values():
        if mcfg.architecture in family.architectures:
            return family
    raise ConfigError(f"model.architecture={mcfg.architecture!r}: must be one of {', '.join(architecture_names())}")
