"""Model, tokenizer and image processor: a model built from a config (`model.architecture`) or a local checkpoint
(`model.path`), of any family in `families/` (Qwen2.5-VL, Qwen3-VL, Qwen3.5).

Both go through the same code: `load_policy(cfg.model)` returns the HF model of the family's class,
`load_tokenizer` / `load_image_processor` the tokenizer (with a chat template) and the PIL image processor on the
family's patch grid, and `encode_prompts` turns (question, images) into model inputs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .config import Config, ConfigError, ModelConfig
from .families import family_for
from .prompts import REQUIRED_TOKENS, chat_prompt, expand_image_pads

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the image-processor settings a checkpoint's files may set (sizes come from data.min_pixels / max_pixels)
IMAGE_PROCESSOR_KEYS = ("image_mean", "image_std", "patch_size", "merge_size", "temporal_patch_size")


def tiny_config(mcfg: ModelConfig, tokenizer):
    """The config of a tiny model (`model.architecture` tiny, tiny-qwen3-vl, …), with the tokenizer's special ids."""
    return family_for(mcfg).tiny_config(mcfg, tokenizer)


def released_config(name: str, tokenizer):
    """The config of a released architecture (`model.architecture`), with the shipped tokenizer's special ids."""
    return family_for(ModelConfig(architecture=name)).released_config(name, tokenizer)


def load_tokenizer(mcfg: ModelConfig):
    path = Path(mcfg.path) if mcfg.path else TOKENIZER_DIR
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"model.path={str(path)!r}: no tokenizer.json there (expected a Hugging Face model "
                          f"directory: config.json, tokenizer.json, weights)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]  # one line, whatever the library printed
        raise ConfigError(f"model.path={str(path)!r}: tokenizer does not load ({reason})") from None
    vocab = tokenizer.get_vocab()
    missing = [token for token in REQUIRED_TOKENS if token not in vocab]
    if missing:  # the chat layout and the image features need them; without them prompts tokenize into pieces
        raise ConfigError(f"model.path={str(path)!r}: the tokenizer lacks {', '.join(missing)} (a Qwen-VL "
                          f"tokenizer has them)")
    if tokenizer.chat_template is None:  # the shipped tokenizer, or a checkpoint without one: the family's
        tokenizer.chat_template = family_for(mcfg).chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def saved_image_processor_settings(model_dir: str | Path) -> tuple[dict, str | None]:
    """A checkpoint's image-processor settings and the file they came from (None: neither file).

    Two layouts, looked up as transformers does: `processor_config.json` with the settings nested under
    "image_processor" (what `ProcessorMixin.save_pretrained` writes since transformers 5) wins; else the flat
    `preprocessor_config.json`.  Returned keys: IMAGE_PROCESSOR_KEYS and min_pixels / max_pixels, where found
    (sizes as `size: {shortest_edge, longest_edge}` or the older top-level `min_pixels` / `max_pixels`).
    """
    model_dir = Path(model_dir)
    saved, origin = None, None
    for name, nested in (("processor_config.json", True), ("preprocessor_config.json", False)):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({' '.join(str(err).split())[:200]})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(content).__name__}")
        if nested:
            content = content.get("image_processor")
            if content is None:  # a processor file without image-processor settings: the flat file holds them
                continue
            if not isinstance(content, dict):
                raise ConfigError(f"{path}: 'image_processor' must be a JSON object")
        saved, origin = content, str(path)
        break
    if saved is None:
        return {}, None
    settings = {k: saved[k] for k in IMAGE_PROCESSOR_KEYS if k in saved}
    size = saved.get("size") if isinstance(saved.get("size"), dict) else {}
    for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = saved.get(key, size.get(size_key))
        if value is not None:
            settings[key] = int(value)
    return settings, origin


def load_image_processor(cfg: Config) -> Qwen2VLImageProcessorPil:
    """The PIL image processor (no torchvision; every Qwen-VL family's), on the family's patch grid with its
    normalization, or with a local checkpoint's saved settings (see `saved_image_processor_settings`); image sizes
    are always data.min_pixels / max_pixels, which the rollout backends and the prompt-length filter use too."""
    settings, origin = saved_image_processor_settings(cfg.model.path) if cfg.model.path else ({}, None)
    saved_range = (settings.get("min_pixels"), settings.get("max_pixels"))
    if origin and saved_range != (None, None) and saved_range != (cfg.data.min_pixels, cfg.data.max_pixels):
        logger.info("%s sizes images to [%s, %s] pixels; this run uses data.min_pixels=%d, data.max_pixels=%d",
                    origin, *saved_range, cfg.data.min_pixels, cfg.data.max_pixels)
    kwargs = {k: settings[k] for k in IMAGE_PROCESSOR_KEYS if k in settings}
    if not {"patch_size", "image_mean", "image_std"} <= kwargs.keys():  # a built model, or no processor file
        family = family_for(cfg.model)
        kwargs = dict(patch_size=family.patch_size, merge_size=family.merge_size, image_mean=list(family.image_mean),
                      image_std=list(family.image_std), **kwargs)
    return Qwen2VLImageProcessorPil(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, **kwargs)


def max_positions(mcfg: ModelConfig) -> int:
    """The model's maximum sequence length (its text config's max_position_embeddings), read without weights."""
    family = family_for(mcfg)
    if not mcfg.path:
        return family.max_positions(mcfg.architecture)
    try:
        config = family.config_class.from_pretrained(mcfg.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={mcfg.path!r}: config.json does not load "
                          f"({' '.join(str(err).split())[:300]})") from None
    return int(config.get_text_config().max_position_embeddings)


def prompt_token_limit(cfg: Config) -> int:
    """The most prompt tokens (image tokens included) a local-data sample may have: data.max_prompt_length, or
    when that is 0 the model's maximum positions minus rollout.max_new_tokens (prompt and response must fit)."""
    positions = max_positions(cfg.model)
    room = positions - cfg.rollout.max_new_tokens
    if cfg.data.max_prompt_length:
        if cfg.data.max_prompt_length > room:
            logger.warning("data.max_prompt_length=%d + rollout.max_new_tokens=%d exceed the model's %d positions",
                           cfg.data.max_prompt_length, cfg.rollout.max_new_tokens, positions)
        return cfg.data.max_prompt_length
    if room < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}: leaves no room for a prompt in the "
                          f"model's {positions} positions")
    return room


def attention_implementation(requested: str) -> str:
    """"auto": flash_attention_2 where flash-attn is importable on a CUDA machine, else PyTorch's sdpa."""
    if requested != "auto":
        return requested
    import importlib.util
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_policy(mcfg: ModelConfig, tokenizer, seed: int = 0):
    """The family's ...ForConditionalGeneration: a checkpoint's (by its config.json model_type), or built from
    `model.architecture` with random weights (seeded)."""
    dtype = DTYPES[mcfg.dtype]
    attention = attention_implementation(mcfg.attn_implementation)
    family = family_for(mcfg)
    if mcfg.path:
        model = family.model_class.from_pretrained(mcfg.path, dtype=dtype, attn_implementation=attention)
    else:
        torch.manual_seed(seed)
        tiny = mcfg.architecture in family.tiny_architectures
        config = family.build_config(mcfg, tokenizer)
        config._attn_implementation = attention
        model = family.model_class(config).to(dtype) if tiny else _build_in_place(family.model_class, config, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _build_in_place(model_class: type, config, dtype: torch.dtype):
    """Billions of random parameters, initialised where they will train (the GPU when there is one) and in the
    training dtype: no fp32 copy in host memory, no host-to-device transfer."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(dtype)


@dataclass
class PromptBatch:
    """Left-padded prompt tensors for B prompts (one or more images each, concatenated in order)."""
    input_ids: torch.Tensor        # [B, P]
    attention_mask: torch.Tensor   # [B, P]
    pixel_values: torch.Tensor     # [num_patches, C*T*p*p], all images of all prompts
    image_grid_thw: torch.Tensor   # [num_images, 3]
    images_per_prompt: list[int]
    images: list[list] | None = None  # the PIL images per prompt (rollout engines that take raw images)

    def to(self, device) -> "PromptBatch":
        """The tensors on `device` (the images stay)."""
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pixel_values.to(device),
                           self.image_grid_thw.to(device), self.images_per_prompt, self.images)

    def patches_per_prompt(self) -> list[int]:
        rows = self.image_grid_thw.prod(-1).tolist()
        out, i = [], 0
        for k in self.images_per_prompt:
            out.append(int(sum(rows[i:i + k])))
            i += k
        return out


def encode_prompts(questions: list[str], images: list[list], tokenizer, image_processor) -> PromptBatch:
    flat = [img for imgs in images for img in imgs]
    vision = image_processor(images=flat, return_tensors="pt")
    grid = vision["image_grid_thw"]
    merge = image_processor.merge_size ** 2
    tokens_per_image = (grid.prod(-1) // merge).tolist()
    texts, i = [], 0
    for question, imgs in zip(questions, images):
        text = chat_prompt(tokenizer, question, len(imgs))
        texts.append(expand_image_pads(text, tokens_per_image[i:i + len(imgs)]))
        i += len(imgs)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(enc["input_ids"], enc["attention_mask"], vision["pixel_values"], grid,
                       [len(imgs) for imgs in images], [list(imgs) for imgs in images])


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """1 on image tokens, 0 elsewhere: the Qwen-VL families need it to build M-RoPE (3-D) positions."""
    return (input_ids == image_token_id).int()
