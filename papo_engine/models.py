"""Model, tokenizer and image processor: the tiny Qwen2.5-VL built from a config, or a local checkpoint.

Both go through the same code: `load_policy(cfg.model)` returns the HF model, `load_processing(cfg)` the
tokenizer and the PIL image processor, and `encode_prompts` turns (question, images) into model inputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .config import Config, ConfigError, ModelConfig
from .prompts import IMAGE_PAD, chat_prompt, expand_image_pads

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_config(mcfg: ModelConfig, tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config small enough to train on 2 CPU cores, with the shipped tokenizer's special ids."""
    head_dim = mcfg.hidden_size // mcfg.num_heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension into temporal / height / width sections
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = tokenizer.convert_tokens_to_ids
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(vocab_size=vocab, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
                num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                num_key_value_heads=mcfg.num_kv_heads, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = dict(depth=mcfg.vision_depth, hidden_size=mcfg.vision_hidden_size, num_heads=mcfg.vision_heads,
                  intermediate_size=2 * mcfg.vision_hidden_size, out_hidden_size=mcfg.hidden_size,
                  fullatt_block_indexes=[mcfg.vision_depth - 1], window_size=112, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE_PAD),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_image_processor(cfg: Config) -> Qwen2VLImageProcessorPil:
    """The PIL image processor (no torchvision); a local checkpoint's preprocessor_config.json is honoured."""
    kwargs = {}
    if cfg.model.path and (Path(cfg.model.path) / "preprocessor_config.json").is_file():
        saved = json.loads((Path(cfg.model.path) / "preprocessor_config.json").read_text())
        kwargs = {k: saved[k] for k in ("image_mean", "image_std", "patch_size", "merge_size",
                                        "temporal_patch_size") if k in saved}
    return Qwen2VLImageProcessorPil(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, **kwargs)


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
        config = tiny_config(mcfg, tokenizer)
        config._attn_implementation = attention
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@dataclass
class PromptBatch:
    """Left-padded prompt tensors for B prompts (one or more images each, concatenated in order)."""
    input_ids: torch.Tensor        # [B, P]
    attention_mask: torch.Tensor   # [B, P]
    pixel_values: torch.Tensor     # [num_patches, C*T*p*p], all images of all prompts
    image_grid_thw: torch.Tensor   # [num_images, 3]
    images_per_prompt: list[int]
    images: list[list] | None = None  # the PIL images per prompt (rollout engines that take raw images)

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
