"""One decode step of Qwen2.5-VL's text decoder, written on its weights: a preallocated key/value cache, a step of
fixed shape, and (on CUDA) that step captured once in a CUDA graph.

Why not the HF module: per generated token `generate` rebuilds masks and positions, grows a DynamicCache by
concatenation and goes through ~20 module calls per layer; on a small model or a GPU that overhead, not the
arithmetic, is the step. Under ZeRO-3 every module call would also gather its parameters again (a collective per
layer per token); here the weights are read directly, gathered once for the whole decode (`NativeRollout`).

The step is the same arithmetic as `Qwen2_5_VLDecoderLayer` (RMSNorm in float32, q/k/v with bias, rotary
embedding, attention, o_proj, SiLU-gated MLP, final norm, lm_head), for the tokens after the prompt: they are text,
so M-RoPE's three position components are equal and the rotary embedding is the plain 1-D one at that position
(recomposing equal sections is the identity). `tests/test_native_rollout.py` checks logits and tokens against HF.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm: normalized in float32, scaled in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def text_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters a decode step reads: the language model's and the lm_head's (not the vision tower's)."""
    params = list(model.model.language_model.parameters())
    seen = {id(p) for p in params}
    return params + [p for p in model.lm_head.parameters() if id(p) not in seen]  # tied: the embedding already


class TextDecoder:
    """Keys/values of `rows` sequences of up to `capacity` tokens, and the decode step over them.

    Slots are addressed by index in the left-padded sequence: the prompt fills 0..P-1 (`fill_prompt`), generated
    token t goes to P + t. `key_mask` [rows, capacity] says which slots a query attends to: the prompt's real tokens
    and the generated slots written so far. `step(width)` attends over the first `width` slots: the CPU passes the
    slots written so far; the CUDA graph passes `capacity` (one fixed shape) and relies on the mask alone."""

    def __init__(self, model, rows: int, capacity: int):
        lm = model.model.language_model
        config = lm.config
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("rollout.backend=native: sliding-window attention is not implemented")
        weight = lm.embed_tokens.weight
        self.model, self.lm = model, lm
        self.rows, self.capacity = rows, capacity
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.act = ACT2FN[config.hidden_act]
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        layers = len(lm.layers)
        self.keys = [weight.new_zeros(shape) for _ in range(layers)]
        self.values = [weight.new_zeros(shape) for _ in range(layers)]
        self.key_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=weight.device)
        self.graph = None

    def fill_prompt(self, cache, n: int, prompt_mask: torch.Tensor) -> None:
        """Copy a prefill's DynamicCache (one entry per distinct prompt) into the slots 0..P-1 of every row: rows
        g·n … g·n + n − 1 take prompt g (a broadcast copy, no [rows, …] intermediate). `prompt_mask` [B, P] marks
        the prompts' real tokens."""
        prompts, width = prompt_mask.shape
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            for slots, prefilled in ((keys, cache.layers[layer].keys), (values, cache.layers[layer].values)):
                slots.view(prompts, n, *slots.shape[1:])[:, :, :, :width].copy_(prefilled.unsqueeze(1))
        self.key_mask.zero_()
        self.key_mask.view(prompts, n, -1)[:, :, :width] = prompt_mask.bool().unsqueeze(1)

    def first_logits(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on the prefill's last hidden state [B, d] (it predicts the first response token)."""
        return F.linear(prompt_hidden, self.model.lm_head.weight)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
        """Logits [rows, V] of the next token after `tokens` [rows], which sit at slot `slot` ([1] long, the same
        for every row) with rotary positions `positions` [rows] (the prompt's largest position + 1 + t)."""
        lm, rows = self.lm, self.rows
        x = F.embedding(tokens, lm.embed_tokens.weight).unsqueeze(1)                    # [rows, 1, d]
        rotary = lm.rotary_emb
        freqs = positions.unsqueeze(1).float() * rotary.inv_freq.float()                # [rows, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * rotary.attention_scaling).to(x.dtype)[:, None, None, :]   # [rows, 1, 1, hd]
        sin = (angles.sin() * rotary.attention_scaling).to(x.dtype)[:, None, None, :]
        self.key_mask.index_fill_(1, slot, True)
        mask = self.key_mask[:, None, None, :width]
        for layer, keys, values in zip(lm.layers, self.keys, self.values):
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(rows, 1, self.heads, -1).transpose(1, 2)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(rows, 1, self.kv_heads, -1).transpose(1, 2)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(rows, 1, self.kv_heads, -1).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            out = F.scaled_dot_product_attention(q, keys[:, :, :width], values[:, :, :width], attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.heads != self.kv_heads)
            x = x + F.linear(out.transpose(1, 2).reshape(rows, 1, -1), attn.o_proj.weight)
            h = _rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + F.linear(self.act(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        return F.linear(_rms_norm(x, lm.norm)[:, 0], self.model.lm_head.weight)

    # ------------------------------------------------------------------------------------------------------
    # CUDA graph: one capture per decoder (per rows × capacity), replayed for every token of every rollout

    def graphed_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """`step` over all `capacity` slots, replayed from a CUDA graph captured on first use. The graph holds the
        addresses of the weights, the cache and its static inputs: optimizer steps update the weights in place, so
        it stays valid across training steps (not under ZeRO-3, whose gathered weights are new tensors each time)."""
        if self.graph is None:
            self._capture(tokens, positions, slot)
        static_tokens, static_positions, static_slot, static_logits = self.inputs_and_output
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        static_slot.copy_(slot)
        self.graph.replay()
        return static_logits

    def _capture(self, tokens, positions, slot) -> None:
        static = (tokens.clone(), positions.clone(), slot.clone())
        mask = self.key_mask.clone()  # warm-up and capture write a slot and its mask bit: restore both after
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, kernels) must happen outside the capture
                self.step(*static, width=self.capacity)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits = self.step(*static, width=self.capacity)
        self.key_mask.copy_(mask)
        self.inputs_and_output = (*static, logits)
