"""Model, tokenizer and image processor: the tiny Qwen2.5-VL built from a config, or a local checkpoint.

Both go through the same code: `load_policy(cfg.model)` returns the HF model, `load_processing(cfg)` the
tokenizer and the PIL image processor, and `encode_prompts` turns (question, images) into model inputs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .config import Config, ConfigError, ModelConfig
from .prompts import IMAGE_PAD, REQUIRED_TOKENS, chat_prompt, expand_image_pads

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY_MAX_POSITIONS = 2048
TINY = ("tiny", "tiny-vocab152k")  # architectures built by tiny_config from the model.* shape fields
# the image-processor settings a checkpoint's files may set (sizes come from data.min_pixels / max_pixels)
IMAGE_PROCESSOR_KEYS = ("image_mean", "image_std", "patch_size", "merge_size", "temporal_patch_size")


def tiny_config(mcfg: ModelConfig, tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config small enough to train on 2 CPU cores, with the shipped tokenizer's special ids."""
    head_dim = mcfg.hidden_size // mcfg.num_heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension into temporal / height / width sections
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    # tiny-vocab152k: Qwen2.5-VL-3B's vocabulary; model.vocab_size: any size from the tokenizer's up (benchmark
    # shapes). Sampled ids the shipped 558-token tokenizer lacks decode to nothing.
    if mcfg.architecture == "tiny-vocab152k":
        vocab = ARCHITECTURES["qwen2.5-vl-3b"]["vocab_size"]
    elif mcfg.vocab_size:
        if mcfg.vocab_size < len(tokenizer):
            raise ConfigError(f"model.vocab_size={mcfg.vocab_size}: smaller than the tokenizer's {len(tokenizer)} "
                              f"tokens")
        vocab = mcfg.vocab_size
    else:
        vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(vocab_size=vocab, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
                num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                num_key_value_heads=mcfg.num_kv_heads, max_position_embeddings=TINY_MAX_POSITIONS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})
    vision = dict(depth=mcfg.vision_depth, hidden_size=mcfg.vision_hidden_size, num_heads=mcfg.vision_heads,
                  intermediate_size=2 * mcfg.vision_hidden_size, out_hidden_size=mcfg.hidden_size,
                  fullatt_block_indexes=[mcfg.vision_depth - 1])
    return _qwen_config(text, vision, tokenizer, tied=False)


def _qwen_config(text: dict, vision: dict, tokenizer, tied: bool) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config from its text and vision shapes: the patch geometry every Qwen2.5-VL shares and the
    tokenizer's special-token ids."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(**text, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    vision = dict(**vision, window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE_PAD),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=tied)


# Released Qwen2.5-VL architectures (their config.json shapes and vocabulary sizes), built with random weights
# for GPU benchmarks: the fused head's cost depends on the real vocabulary (the shipped tokenizer has 558 tokens;
# ids it lacks decode to nothing). Special-token ids come from the shipped tokenizer, as for the tiny model.
VISION_3B_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                    fullatt_block_indexes=[7, 15, 23, 31])
ARCHITECTURES = {
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
RELEASED_MAX_POSITIONS = 128000


def released_config(name: str, tokenizer) -> Qwen2_5_VLConfig:
    """The config of a released Qwen2.5-VL (`ARCHITECTURES`), with the shipped tokenizer's special ids."""
    shape = dict(ARCHITECTURES[name])
    tied = shape.pop("tie_word_embeddings")
    text = dict(**shape, max_position_embeddings=RELEASED_MAX_POSITIONS, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(**VISION_3B_7B, out_hidden_size=shape["hidden_size"], tokens_per_second=2)
    return _qwen_config(text, vision, tokenizer, tied)


def load_tokenizer(mcfg: ModelConfig):
    path = Path(mcfg.path) if mcfg.path else TOKENIZER_DIR
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"model.path={str(path)!r}: no tokenizer.json there (expected a Hugging Face "
                          f"Qwen2.5-VL directory: config.json, tokenizer.json, weights)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]  # one line, whatever the library printed
        raise ConfigError(f"model.path={str(path)!r}: tokenizer does not load ({reason})") from None
    vocab = tokenizer.get_vocab()
    missing = [token for token in REQUIRED_TOKENS if token not in vocab]
    if missing:  # the chat layout and the image features need them; without them prompts tokenize into pieces
        raise ConfigError(f"model.path={str(path)!r}: the tokenizer lacks {', '.join(missing)} (a Qwen2.5-VL "
                          f"tokenizer has them)")
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
    """The PIL image processor (no torchvision), with a local checkpoint's saved settings (see
    `saved_image_processor_settings`); image sizes are always data.min_pixels / max_pixels, which the rollout
    backends and the prompt-length filter use too."""
    settings, origin = saved_image_processor_settings(cfg.model.path) if cfg.model.path else ({}, None)
    saved_range = (settings.get("min_pixels"), settings.get("max_pixels"))
    if origin and saved_range != (None, None) and saved_range != (cfg.data.min_pixels, cfg.data.max_pixels):
        logger.info("%s sizes images to [%s, %s] pixels; this run uses data.min_pixels=%d, data.max_pixels=%d",
                    origin, *saved_range, cfg.data.min_pixels, cfg.data.max_pixels)
    kwargs = {k: settings[k] for k in IMAGE_PROCESSOR_KEYS if k in settings}
    return Qwen2VLImageProcessorPil(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, **kwargs)


def max_positions(mcfg: ModelConfig) -> int:
    """The model's maximum sequence length (its text config's max_position_embeddings), read without weights."""
    if not mcfg.path:
        return TINY_MAX_POSITIONS if mcfg.architecture in TINY else RELEASED_MAX_POSITIONS
    try:
        config = Qwen2_5_VLConfig.from_pretrained(mcfg.path)
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


def load_policy(mcfg: ModelConfig, tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    dtype = DTYPES[mcfg.dtype]
    attention = attention_implementation(mcfg.attn_implementation)
    if mcfg.path:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mcfg.path, dtype=dtype, attn_implementation=attention)
    else:
        torch.manual_seed(seed)
        tiny = mcfg.architecture in TINY
        config = tiny_config(mcfg, tokenizer) if tiny else released_config(mcfg.architecture, tokenizer)
        config._attn_implementation = attention
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype) if tiny else _build_in_place(config, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _build_in_place(config: Qwen2_5_VLConfig, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """Billions of random parameters, initialised where they will train (the GPU when there is one) and in the
    training dtype: no fp32 copy in host memory, no host-to-device transfer."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2_5_VLForConditionalGeneration(config)
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
        texts.append(expand_image_pads(chat_prompt(question, len(imgs)), tokens_per_image[i:i + len(imgs)]))
        i += len(imgs)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(enc["input_ids"], enc["attention_mask"], vision["pixel_values"], grid,
                       [len(imgs) for imgs in images], [list(imgs) for imgs in images])


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """1 on image tokens, 0 elsewhere: Qwen2.5-VL needs it to build M-RoPE (3-D) positions."""
    return (input_ids == image_token_id).int()
