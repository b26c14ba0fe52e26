"""Qwen3.5 (`qwen3_5`), natively multimodal: Qwen3-VL's vision side (16-px patches merged 2×2, no DeepStack) and a
hybrid text decoder — Gated DeltaNet linear-attention layers (a short causal convolution and a recurrent state, no
keys and values) with a gated full-attention layer every 4th (q/k RMSNorm, rotary on a quarter of each head).

A prompt's cache is therefore per layer either keys and values or a convolution and a recurrent state; the
shared-prompt forward expands both kinds to the responses (`expanded_cache`). The native decode step is written
for attention layers only: rollout.backend=native is refused for this family (use hf).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer

from ..config import ModelConfig
from .base import TINY_MAX_POSITIONS, mrope_sections, tiny_vocab_size
from .qwen3_vl import Qwen3VisionSide

LINEAR, FULL = "linear_attention", "full_attention"
FULL_ATTENTION_INTERVAL = 4
PARTIAL_ROTARY = 0.25  # the rotary embedding turns the first quarter of each attention head
# released shapes, from the official config.json files (Qwen/Qwen3.5-0.8B, Qwen/Qwen3.5-9B) as reproduced in public
# code (not read from the checkpoints here); random weights, for GPU benchmarks
_LINEAR_HEADS = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                     linear_num_key_heads=16)
RELEASED = {
    "qwen3.5-0.8b": dict(
        text=dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256, linear_num_value_heads=16, **_LINEAR_HEADS),
        vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12),
        tie_word_embeddings=True, max_position_embeddings=262144),
    "qwen3.5-9b": dict(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=256, linear_num_value_heads=32, **_LINEAR_HEADS),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16),
        tie_word_embeddings=False, max_position_embeddings=262144),
}
RELEASED_VOCAB = 248320
TINY_POSITION_EMBEDDINGS = 256


def layer_types(layers: int) -> list[str]:
    """Linear attention, with full attention on every 4th layer — and on the last, so that a tiny model of fewer
    than 4 layers has one."""
    return [FULL if (i + 1) % FULL_ATTENTION_INTERVAL == 0 or i == layers - 1 else LINEAR for i in range(layers)]


class PromptStates(LinearAttentionLayer):
    """A linear-attention layer's prompt states (convolution window, recurrent state) for the response forward, which
    continues from them and never writes them back: the forward's in-place state update would overwrite a tensor
    autograd saved for the backward (the state after the responses is not needed)."""

    def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor, kernel: int):
        super().__init__()
        self.conv_states[0], self.recurrent_states[0] = conv, recurrent
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.conv_kernel_size[0] = kernel
        self.dtype, self.device = conv.dtype, conv.device
        # a one-token forward would otherwise take the fused decode update, which writes the convolution state in place
        self.record_past = True

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        return torch.cat([self.conv_states[state_idx], conv_states], dim=-1)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        return recurrent_states


class Qwen35(Qwen3VisionSide):
    model_type = "qwen3_5"
    label = "Qwen3.5"
    model_class = Qwen3_5ForConditionalGeneration
    config_class = Qwen3_5Config
    tiny_architectures = ("tiny-qwen3.5",)
    released = RELEASED
    recurrent_layers = True
    native_refusal = ("rollout.backend=native: Qwen3.5's linear-attention (Gated DeltaNet) layers decode from a "
                      "recurrent state the native decode step does not implement; use rollout.backend=hf")

    def tiny_config(self, mcfg: ModelConfig, tokenizer) -> Qwen3_5Config:
        """Linear-attention heads of the attention heads' size: key heads = model.num_kv_heads, value heads =
        model.num_heads."""
        head_dim = mcfg.hidden_size // mcfg.num_heads
        text = dict(vocab_size=tiny_vocab_size(mcfg, tokenizer), hidden_size=mcfg.hidden_size,
                    intermediate_size=mcfg.intermediate_size, num_hidden_layers=mcfg.num_layers,
                    num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_kv_heads, head_dim=head_dim,
                    linear_conv_kernel_dim=4, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                    linear_num_key_heads=mcfg.num_kv_heads, linear_num_value_heads=mcfg.num_heads,
                    max_position_embeddings=TINY_MAX_POSITIONS)
        vision = dict(depth=mcfg.vision_depth, hidden_size=mcfg.vision_hidden_size, num_heads=mcfg.vision_heads,
                      intermediate_size=2 * mcfg.vision_hidden_size, num_position_embeddings=TINY_POSITION_EMBEDDINGS)
        return self._config(text, vision, tokenizer, 10000.0, mrope_sections(int(head_dim * PARTIAL_ROTARY)),
                            tied=False)

    def released_config(self, name: str, tokenizer) -> Qwen3_5Config:
        shape = RELEASED[name]
        text = dict(**shape["text"], vocab_size=RELEASED_VOCAB,
                    max_position_embeddings=shape["max_position_embeddings"])
        vision = dict(**shape["vision"], num_position_embeddings=2304)
        return self._config(text, vision, tokenizer, 10000000.0, [11, 11, 10], shape["tie_word_embeddings"])

    def _config(self, text: dict, vision: dict, tokenizer, rope_theta: float, mrope: list[int],
                tied: bool) -> Qwen3_5Config:
        text = dict(**text, **self.text_token_ids(tokenizer), tie_word_embeddings=tied, rms_norm_eps=1e-6,
                    layer_types=layer_types(text["num_hidden_layers"]),
                    rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope,
                                     "mrope_interleaved": True, "partial_rotary_factor": PARTIAL_ROTARY})
        vision = dict(**vision, out_hidden_size=text["hidden_size"], patch_size=self.patch_size,
                      spatial_merge_size=self.merge_size, temporal_patch_size=2)
        return Qwen3_5Config(text_config=text, vision_config=vision, **self.special_token_ids(tokenizer),
                             tie_word_embeddings=tied)

    # ------------------------------------------------------------------------------------------------------
    # the hybrid prompt cache

    def new_prompt_cache(self, model) -> DynamicCache:
        """A cache with a linear-attention layer where the model has one (an empty DynamicCache has none)."""
        return DynamicCache(config=model.config)

    def prompt_cache_states(self, cache) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: (keys, values) of a full-attention layer, (convolution window, recurrent state) of a
        linear-attention one."""
        return [(layer.conv_states[0], layer.recurrent_states[0]) if isinstance(layer, LinearAttentionLayer)
                else (layer.keys, layer.values) for layer in cache.layers]

    def expanded_cache(self, states, index: torch.Tensor, model) -> Cache:
        text = model.config.get_text_config()
        layers = []
        for kind, (first, second) in zip(text.layer_types, states):
            if kind == LINEAR:
                layers.append(PromptStates(first[index], second[index], text.linear_conv_kernel_dim))
            else:
                layers.append(DynamicLayer())
                layers[-1].update(first[index], second[index])
        return Cache(layers=layers)


FAMILY = Qwen35()
