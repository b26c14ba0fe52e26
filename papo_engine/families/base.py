"""What a model family is to the engine: `ModelFamily`, the one object per family (`families/<family>.py`) that the
model loading, the prompt encoding, the shared-prompt forward and the rollout backends ask instead of testing
`model_type` themselves.

The defaults here are what the Qwen-VL families share: a vision tower whose 2×2-merged patches become the prompt's
image tokens, a text decoder whose prompt cache is keys and values per layer (`DynamicCache`), the Qwen chat
special tokens. A family file overrides what differs (`qwen3_5.py`: a cache with recurrent states).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ..config import ConfigError, ModelConfig
from ..prompts import IMAGE_PAD

TINY_MAX_POSITIONS = 2048


class ModelFamily:
    model_type: str              # config.json's model_type
    label: str                   # the name users know: "Qwen2.5-VL"
    model_class: type            # transformers' ...ForConditionalGeneration
    config_class: type
    tiny_architectures: tuple[str, ...]  # model.architecture names built from the model.* shape fields
    released: dict[str, dict]    # model.architecture name -> a released checkpoint's shapes (random weights)
    # the image processor of a model built from a config (a checkpoint brings its own settings)
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    merge_size = 2               # patches merged per side into one image token
    chat_template: str           # Jinja, as a checkpoint's tokenizer carries it (used where the tokenizer has none)
    recurrent_layers = False     # text layers whose decode state is a recurrent state, not keys and values
    # the native decode step (rollout/decoder.py): None where it runs this family, else why not (one line)
    native_refusal: str | None = None
    decode_qk_norm = False       # the decode step normalizes each query and key head (RMSNorm) before the rotary

    @property
    def unit_px(self) -> int:
        """Pixels per side of one image token (a merged unit of patches)."""
        return self.patch_size * self.merge_size

    @property
    def architectures(self) -> tuple[str, ...]:
        return (*self.tiny_architectures, *self.released)

    # ------------------------------------------------------------------------------------------------------
    # configs of models built without a checkpoint

    def build_config(self, mcfg: ModelConfig, tokenizer):
        """The config of `mcfg.architecture`, with the tokenizer's special-token ids."""
        if mcfg.architecture in self.tiny_architectures:
            return self.tiny_config(mcfg, tokenizer)
        return self.released_config(mcfg.architecture, tokenizer)

    def tiny_config(self, mcfg: ModelConfig, tokenizer):
        raise NotImplementedError

    def released_config(self, name: str, tokenizer):
        raise NotImplementedError

    def max_positions(self, architecture: str) -> int:
        """The built model's maximum sequence length."""
        if architecture in self.tiny_architectures:
            return TINY_MAX_POSITIONS
        return self.released[architecture]["max_position_embeddings"]

    def special_token_ids(self, tokenizer) -> dict:
        """The multimodal config's special-token ids, from the tokenizer the prompts are encoded with."""
        ids = tokenizer.convert_tokens_to_ids
        return dict(image_token_id=ids(IMAGE_PAD), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))

    def text_token_ids(self, tokenizer) -> dict:
        ids = tokenizer.convert_tokens_to_ids
        return dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                    pad_token_id=tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------------------
    # the prompt cache of the shared-prompt forward (actor.py) and the native rollout's prefill

    def new_prompt_cache(self, model) -> DynamicCache:
        """An empty cache for a prefill of prompts."""
        return DynamicCache()

    def prompt_cache_states(self, cache) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the prefill's state tensors, each indexed by prompt along dim 0 (here: keys and values)."""
        return [(layer.keys, layer.values) for layer in cache.layers]

    def expanded_cache(self, states: list[tuple[torch.Tensor, ...]], index: torch.Tensor, model) -> DynamicCache:
        """A cache for the response forward of rows `index` (row i continues prompt index[i]), gradients flowing back
        to `states`."""
        return DynamicCache([tuple(state[index] for state in layer) for layer in states])


def mrope_sections(rotary_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half-dimension into temporal / height / width sections, for a tiny model."""
    half = rotary_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def tiny_vocab_size(mcfg: ModelConfig, tokenizer) -> int:
    """model.vocab_size (benchmark shapes; ids the shipped 558-token tokenizer lacks decode to nothing), else the
    tokenizer's size rounded up to 64."""
    if mcfg.vocab_size:
        if mcfg.vocab_size < len(tokenizer):
            raise ConfigError(f"model.vocab_size={mcfg.vocab_size}: smaller than the tokenizer's {len(tokenizer)} "
                              f"tokens")
        return mcfg.vocab_size
    return (len(tokenizer) + 63) // 64 * 64
