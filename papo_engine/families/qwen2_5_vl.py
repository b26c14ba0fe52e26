"""Qwen2.5-VL (`qwen2_5_vl`): 14-px patches merged 2×2 (28-px image tokens), windowed vision attention, text layers
with q/k/v bias and M-RoPE in contiguous sections, a default system turn in its chat template."""
from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..config import ModelConfig
from ..prompts import SYSTEM_PROMPT, qwen_chat_template
from .base import TINY_MAX_POSITIONS, ModelFamily, mrope_sections, tiny_vocab_size

# Released architectures (their config.json shapes and vocabulary sizes), built with random weights for GPU
# benchmarks: the fused head's cost depends on the real vocabulary (the shipped tokenizer has 558 tokens; ids it
# lacks decode to nothing).
VISION_3B_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                    fullatt_block_indexes=[7, 15, 23, 31])
RELEASED = {
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=128000),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                          max_position_embeddings=128000),
}


class Qwen25VL(ModelFamily):
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    tiny_architectures = ("tiny", "tiny-vocab152k")
    released = RELEASED
    patch_size = 14
    image_mean = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics
    image_std = (0.26862954, 0.26130258, 0.27577711)
    chat_template = qwen_chat_template(SYSTEM_PROMPT)

    def tiny_config(self, mcfg: ModelConfig, tokenizer) -> Qwen2_5_VLConfig:
        """Small enough to train on 2 CPU cores. tiny-vocab152k: Qwen2.5-VL-3B's vocabulary (benchmark shapes)."""
        vocab = (RELEASED["qwen2.5-vl-3b"]["vocab_size"] if mcfg.architecture == "tiny-vocab152k"
                 else tiny_vocab_size(mcfg, tokenizer))
        text = dict(vocab_size=vocab, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
                    num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                    num_key_value_heads=mcfg.num_kv_heads, max_position_embeddings=TINY_MAX_POSITIONS,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": mrope_sections(mcfg.hidden_size // mcfg.num_heads)})
        vision = dict(depth=mcfg.vision_depth, hidden_size=mcfg.vision_hidden_size, num_heads=mcfg.vision_heads,
                      intermediate_size=2 * mcfg.vision_hidden_size, out_hidden_size=mcfg.hidden_size,
                      fullatt_block_indexes=[mcfg.vision_depth - 1])
        return self._config(text, vision, tokenizer, tied=False)

    def released_config(self, name: str, tokenizer) -> Qwen2_5_VLConfig:
        shape = dict(RELEASED[name])
        tied = shape.pop("tie_word_embeddings")
        text = dict(**shape, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(**VISION_3B_7B, out_hidden_size=shape["hidden_size"], tokens_per_second=2)
        return self._config(text, vision, tokenizer, tied)

    def _config(self, text: dict, vision: dict, tokenizer, tied: bool) -> Qwen2_5_VLConfig:
        """The patch geometry every Qwen2.5-VL shares and the tokenizer's special-token ids."""
        text = dict(**text, **self.text_token_ids(tokenizer), tie_word_embeddings=tied)
        vision = dict(**vision, window_size=112, patch_size=self.patch_size, spatial_merge_size=self.merge_size,
                      temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **self.special_token_ids(tokenizer),
                                tie_word_embeddings=tied)


FAMILY = Qwen25VL()
