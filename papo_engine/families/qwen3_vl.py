"""Qwen3-VL (`qwen3_vl`): 16-px patches merged 2×2 (32-px image tokens) with learned position embeddings and
DeepStack (vision features added to the first text layers' hidden states at the image positions — prompt positions
only, so a decode step of text tokens is unaffected); text layers in Qwen3's style: per-head RMSNorm of q and k,
no q/k/v bias, M-RoPE with interleaved sections; no default system turn in its chat template."""
from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ..config import ModelConfig
from ..prompts import qwen_chat_template
from .base import TINY_MAX_POSITIONS, ModelFamily, mrope_sections, tiny_vocab_size

# Qwen/Qwen3-VL-4B-Instruct's config.json shapes (random weights: GPU benchmarks)
RELEASED = {
    "qwen3-vl-4b": dict(
        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True, max_position_embeddings=262144),
}
TINY_POSITION_EMBEDDINGS = 256  # a 16 × 16 grid of learned vision positions, interpolated to each image's grid


class Qwen3VisionSide(ModelFamily):
    """What Qwen3-VL and Qwen3.5 share before the text decoder: the image processor's grid and normalization, and
    the chat template without a default system turn."""
    patch_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    chat_template = qwen_chat_template(None)


class Qwen3VL(Qwen3VisionSide):
    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    model_class = Qwen3VLForConditionalGeneration
    config_class = Qwen3VLConfig
    tiny_architectures = ("tiny-qwen3-vl",)
    released = RELEASED
    decode_qk_norm = True

    def tiny_config(self, mcfg: ModelConfig, tokenizer) -> Qwen3VLConfig:
        head_dim = mcfg.hidden_size // mcfg.num_heads
        text = dict(vocab_size=tiny_vocab_size(mcfg, tokenizer), hidden_size=mcfg.hidden_size,
                    intermediate_size=mcfg.intermediate_size, num_hidden_layers=mcfg.num_layers,
                    num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_kv_heads, head_dim=head_dim,
                    max_position_embeddings=TINY_MAX_POSITIONS)
        vision = dict(depth=mcfg.vision_depth, hidden_size=mcfg.vision_hidden_size, num_heads=mcfg.vision_heads,
                      intermediate_size=2 * mcfg.vision_hidden_size, num_position_embeddings=TINY_POSITION_EMBEDDINGS,
                      deepstack_visual_indexes=[0])
        return self._config(text, vision, tokenizer, 10000.0, mrope_sections(head_dim), tied=False)

    def released_config(self, name: str, tokenizer) -> Qwen3VLConfig:
        shape = RELEASED[name]
        text = dict(**shape["text"], max_position_embeddings=shape["max_position_embeddings"])
        return self._config(text, dict(shape["vision"]), tokenizer, 5000000.0, [24, 20, 20],
                            shape["tie_word_embeddings"])

    def _config(self, text: dict, vision: dict, tokenizer, rope_theta: float, mrope: list[int],
                tied: bool) -> Qwen3VLConfig:
        text = dict(**text, **self.text_token_ids(tokenizer), tie_word_embeddings=tied, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope,
                                     "mrope_interleaved": True})
        vision = dict(**vision, out_hidden_size=text["hidden_size"], patch_size=self.patch_size,
                      spatial_merge_size=self.merge_size, temporal_patch_size=2)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **self.special_token_ids(tokenizer),
                             tie_word_embeddings=tied)


FAMILY = Qwen3VL()
