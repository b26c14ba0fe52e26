"""One decode step of a Qwen2.5-VL or Qwen3-VL text decoder, written on its weights, over a batch that finished rows
leave.

Why not the HF module: per generated token `generate` rebuilds masks and positions, grows a DynamicCache by
concatenation and goes through ~20 module calls per layer; on a small model or a GPU that overhead, not the
arithmetic, is the step. Under ZeRO-3 every module call would also gather its parameters again (a collective per
layer per token); here the weights are read directly, gathered once for the whole decode (`NativeRollout`).

The step is the same arithmetic as `Qwen2_5_VLDecoderLayer` (RMSNorm in float32, q/k/v with bias, rotary
embedding, attention, o_proj, SiLU-gated MLP, final norm, lm_head) and `Qwen3VLTextDecoderLayer` (the same without
q/k/v bias, with each query and key head RMS-normalized before the rotary: the family's `decode_qk_norm`), for the
tokens after the prompt: they are text, so M-RoPE's three position components are equal and the rotary embedding is
the plain 1-D one at that position — recomposing equal components is the identity, for Qwen2.5-VL's contiguous
sections and Qwen3-VL's interleaved ones alike. `tests/test_native_rollout.py` and `tests/test_families.py` check
logits and tokens against HF.

Where the keys and values live. The n responses to a prompt share its keys and values, so they stay where the
prefill left them, once per prompt ([groups, kv, P, hd] per layer), and each row's generated tokens have a cache
of their own ([rows, kv, T, hd]). A step's attention reads each prompt's keys and values ONCE for all of its rows
(the query heads of the prompt's rows stacked into one matrix), reads each row's generated keys, and joins both
in one softmax: the attention over the row's whole sequence, with the prompt — most of the context once an image
is in it — read once per prompt instead of n times.

Finished rows leave. The step runs on the first `active` rows of the buffers; `compact` moves the unfinished rows
to the front (their generated keys and values, their prompts' too) when their number fits a smaller size of
`row_buckets`: a few sizes, so a CUDA graph per (size, width) covers every step. Spare rows of a size (fewer
unfinished rows than it holds) compute and are ignored.

Width. A step attends over the generated slots written so far: exactly those on the CPU; the CUDA graph over the
smallest of a few widths (`width_bucket`) that holds them, the slots beyond masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from papo_kernels import cpp_backend
from transformers.activations import ACT2FN

from ..families import family_of
from ..lora import merged_weight

BUCKET_STEP = 4  # row sizes below the full batch: multiples of 4 (and 2, 1); ~0.9 of the row-steps are real


def row_buckets(rows: int) -> list[int]:
    """The row counts a decode of `rows` rows runs at, largest first."""
    return sorted({rows, *(s for s in (1, 2) if s < rows), *range(BUCKET_STEP, rows, BUCKET_STEP)}, reverse=True)


def width_bucket(width: int, capacity: int) -> int:
    """The CUDA graph's attention width for `width` generated slots: the next power of two (at least 16), at most
    `capacity`."""
    return min(capacity, max(16, 1 << (width - 1).bit_length()))


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm: normalized in float32, scaled in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


PACK_ROWS = 16  # the batch-size hint the weights are packed for (any number of rows works)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def text_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters a decode step reads: the language model's and the lm_head's (not the vision tower's)."""
    params = list(model.model.language_model.parameters())
    seen = {id(p) for p in params}
    return params + [p for p in model.lm_head.parameters() if id(p) not in seen]  # tied: the embedding already


class TextDecoder:
    """The caches of `groups` prompts × `n` rows of up to `capacity` generated tokens, and the step over them.

    Row r of the current batch (r < active) answers prompt slot `row_group[r]` and sits at `grid_slot[r]` of the
    [prompt slots × n] grid the prompt attention is computed on; generated token t of a row is at slot t of its
    cache, the same t for every row (they start together)."""

    def __init__(self, model, groups: int, n: int, prompt_width: int, capacity: int, kernel: str = "auto"):
        """`kernel`: "auto" runs a float32 CPU decode as `_cpu_step` (the C++ attention op `decode_attention_cpp`
        and oneDNN's packed matrix products, when both are there), "torch": always the plain step (the reference)."""
        lm = model.model.language_model
        config = lm.config
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("rollout.backend=native: sliding-window attention is not implemented")
        weight = lm.embed_tokens.weight
        self.model, self.lm = model, lm
        self.groups, self.n, self.rows = groups, n, groups * n
        self.prompt_width, self.capacity = prompt_width, capacity
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = lm.layers[0].self_attn.head_dim  # Qwen3-VL's config sets it apart from hidden / heads
        self.qk_norm = family_of(model).decode_qk_norm
        self.act = ACT2FN[config.hidden_act]
        layers = range(len(lm.layers))
        prompt_shape = (groups, self.kv_heads, prompt_width, self.head_dim)
        self.prompt_keys = [weight.new_zeros(prompt_shape) for _ in layers]
        self.prompt_values = [weight.new_zeros(prompt_shape) for _ in layers]
        shape = (self.rows, self.kv_heads, capacity, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in layers]
        self.values = [weight.new_zeros(shape) for _ in layers]
        device = weight.device
        # added to the scores (float32): 0 on a prompt's tokens, −inf on its left padding
        self.prompt_bias = torch.zeros(groups, prompt_width, dtype=torch.float32, device=device)
        self.row_group = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.grid_slot = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.active = self.rows
        self.graphs: dict[tuple[int, int], tuple] = {}  # (active rows, width) -> graph and its static tensors
        self.weights: list[tuple] | None = None         # per layer, read at each fill (`_read_weights`)
        self.graph_pool = None
        self.cpu_kernel = kernel == "auto" and device.type == "cpu" and weight.dtype == torch.float32 and \
            torch.backends.mkldnn.is_available() and cpp_backend.is_available("decode")

    @property
    def active_groups(self) -> int:
        """Prompt slots in use at the current size: a spare slot, when there is one, has no row."""
        return min(self.groups, self.active)

    def fill_prompt(self, cache, prompt_mask: torch.Tensor) -> None:
        """Take a prefill's DynamicCache (one entry per prompt, [groups, kv, P, hd] per layer) and `prompt_mask`
        [groups, P] (the prompts' real tokens); row g·n + k answers prompt g. Starts a decode: all rows active."""
        for layer in range(len(self.keys)):
            self.prompt_keys[layer].copy_(cache.layers[layer].keys)
            self.prompt_values[layer].copy_(cache.layers[layer].values)
        self.prompt_bias.copy_(torch.zeros_like(self.prompt_bias).masked_fill(~prompt_mask.bool(), float("-inf")))
        rows = torch.arange(self.rows, device=self.row_group.device)
        self.row_group.copy_(rows // self.n)
        self.grid_slot.copy_(rows)
        self.active = self.rows
        self._read_weights()
        if self.cpu_kernel:
            self._pack_weights()

    def first_logits(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on the prefill's last hidden state [groups, d] (it predicts the first response token)."""
        return F.linear(prompt_hidden, self.model.lm_head.weight)

    def compact(self, keep: torch.Tensor, size: int, written: int) -> torch.Tensor:
        """Keep rows `keep` (ascending indices of the current batch, at most `size`) as rows 0..len(keep)-1 of a
        batch of `size` rows, moving their first `written` generated slots and their prompts; spare rows copy the
        last kept one (their outputs are ignored). Returns the current-batch index each new row came from [size]."""
        source = torch.cat([keep, keep[-1:].expand(size - len(keep))])
        groups = self.row_group[:self.active][source]
        kept_groups, new_group = torch.unique(groups[:len(keep)], sorted=True, return_inverse=True)
        slots = min(self.groups, size)  # prompt slots of the new size (active_groups after the move)
        group_source = torch.cat([kept_groups, kept_groups[-1:].expand(slots - len(kept_groups))])
        for cache in (*self.keys, *self.values):
            cache[:size, :, :written] = cache[source, :, :written]
        for cache in (*self.prompt_keys, *self.prompt_values):
            cache[:slots] = cache[group_source]
        self.prompt_bias[:slots] = self.prompt_bias[group_source]
        # grid slots: the kept rows of prompt slot j take j·n, j·n + 1, ...; spare rows the slots left free
        new_group = torch.cat([new_group, new_group.new_zeros(size - len(keep))])
        taken = torch.zeros(slots * self.n, dtype=torch.bool, device=keep.device)
        grid = torch.empty(size, dtype=torch.long, device=keep.device)
        first = torch.searchsorted(new_group[:len(keep)], new_group[:len(keep)])  # each kept row's group start
        grid[:len(keep)] = new_group[:len(keep)] * self.n + torch.arange(len(keep), device=keep.device) - first
        taken[grid[:len(keep)]] = True
        grid[len(keep):] = torch.nonzero(~taken).flatten()[:size - len(keep)]
        self.row_group[:size] = new_group
        self.grid_slot[:size] = grid
        self.active = size
        return source

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
        """Logits [active, V] of the next token after `tokens` [active], written at generated slot `slot` ([1] long,
        the same for every row) with rotary positions `positions` [active]; attends over generated slots
        0..width-1, those after `slot` masked (width = slot + 1 on the CPU)."""
        lm, rows = self.lm, self.active
        x = F.embedding(tokens, lm.embed_tokens.weight).unsqueeze(1)                    # [rows, 1, d]
        rotary = lm.rotary_emb
        freqs = positions.unsqueeze(1).float() * rotary.inv_freq.float()                # [rows, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * rotary.attention_scaling).to(x.dtype)                     # [rows, hd]
        sin = (angles.sin() * rotary.attention_scaling).to(x.dtype)
        if self.cpu_kernel:
            return self._cpu_step(x, cos, sin, int(slot))
        # added to every layer's scores [rows, 1, 1, P + width]: prompt padding, unwritten slots at −inf
        unwritten = torch.arange(width, device=tokens.device) > slot
        bias = torch.cat([self.prompt_bias[self.row_group[:rows]], torch.zeros(
            rows, width, device=tokens.device).masked_fill(unwritten, float("-inf"))], -1)[:, None, None, :]
        for layer, (attn_layer, (wq, wk, wv, wo, w_gate, w_up, w_down)) in enumerate(zip(lm.layers, self.weights)):
            attn = attn_layer.self_attn
            h = _rms_norm(x, attn_layer.input_layernorm)
            q = F.linear(h, wq, attn.q_proj.bias).view(rows, self.heads, -1)
            k = F.linear(h, wk, attn.k_proj.bias).view(rows, self.kv_heads, -1)
            v = F.linear(h, wv, attn.v_proj.bias).view(rows, self.kv_heads, -1)
            if self.qk_norm:
                q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            self.keys[layer][:rows].index_copy_(2, slot, k.unsqueeze(2))
            self.values[layer][:rows].index_copy_(2, slot, v.unsqueeze(2))
            out = self._attention(layer, q.unsqueeze(2), width, bias, attn.scaling)
            x = x + F.linear(out.reshape(rows, 1, -1), wo)
            h = _rms_norm(x, attn_layer.post_attention_layernorm)
            x = x + F.linear(self.act(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
        return F.linear(_rms_norm(x, lm.norm)[:, 0], self.model.lm_head.weight)

    def _cpu_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: int) -> torch.Tensor:
        """`step` on a float32 CPU decode: the same arithmetic in fewer and faster operations — the attention
        (rotary, cache write, prompt and generated slots) in one C++ op, the matrix products on weights packed per
        rollout for oneDNN (`_pack_weights`: q/k/v and gate/up concatenated), RMSNorm as torch's fused op."""
        lm, rows = self.lm, self.active
        x = x[:, 0]                                                                       # [rows, d]
        linear = _packed_linear
        for layer, (attn_layer, (qkv, qkv_bias, o_proj, gate_up, down)) in enumerate(zip(lm.layers, self.packed)):
            attn, norm = attn_layer.self_attn, attn_layer.input_layernorm
            h = F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
            projected = linear(h, qkv, qkv_bias)                                          # [rows, (H + 2·KV)·hd]
            if self.qk_norm:
                self._normalize_qk(projected, attn)
            out = cpp_backend.decode_attention_cpp(
                projected, self.heads, cos, sin, self.prompt_keys[layer], self.prompt_values[layer],
                self.prompt_bias, self.row_group[:rows], self.keys[layer], self.values[layer], slot, attn.scaling)
            x = x + linear(out, o_proj)
            norm = attn_layer.post_attention_layernorm
            gate, up = linear(F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon), gate_up).chunk(2, -1)
            x = x + linear(self.act(gate) * up, down)
        return linear(F.rms_norm(x, x.shape[-1:], lm.norm.weight, lm.norm.variance_epsilon), self.packed_head)

    def _read_weights(self) -> None:
        """Each layer's (q, k, v, o, gate, up, down) weights as the step reads them, per rollout: the parameters
        themselves, or under LoRA the adapters folded in (`lora.merged_weight`, W + scale·B·A, computed once here
        instead of two extra products per layer and token). Merged weights are copied into the tensors of the first
        rollout, whose addresses the CUDA graphs hold."""
        fresh = []
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fresh.append(tuple(merged_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                          mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
        if self.weights is None:
            self.weights = fresh
            return
        for held, new in zip(self.weights, fresh):
            for old, value in zip(held, new):
                if old is not value:
                    old.copy_(value)

    def _pack_weights(self) -> None:
        """The decode's weights packed for oneDNN's matrix products (1.5–2× MKL's at a few rows on the 2-core CPU,
        4–7× for a 151,936-token lm_head), q/k/v and gate/up concatenated: per rollout, as the weights change with
        every optimizer step."""
        self.packed = []
        for layer, (wq, wk, wv, wo, w_gate, w_up, w_down) in zip(self.lm.layers, self.weights):
            attn = layer.self_attn
            biased = attn.q_proj.bias is not None  # Qwen2.5-VL's q/k/v have biases, Qwen3-VL's none
            self.packed.append((
                _pack(torch.cat([wq, wk, wv])),
                torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]) if biased else None,
                _pack(wo), _pack(torch.cat([w_gate, w_up])), _pack(w_down)))
        self.packed_head = _pack(self.model.lm_head.weight)

    def _normalize_qk(self, projected: torch.Tensor, attn) -> None:
        """RMS-normalize each query and key head of `projected` [rows, (H + 2·KV)·hd] (q, k, v side by side) in place,
        with the layer's q_norm / k_norm weights, as `step` does before the rotary."""
        rows, q_width, k_width = projected.shape[0], self.heads * self.head_dim, self.kv_heads * self.head_dim
        for part, norm in ((projected[:, :q_width], attn.q_norm),
                           (projected[:, q_width:q_width + k_width], attn.k_norm)):
            heads = part.view(rows, -1, self.head_dim)
            heads.copy_(F.rms_norm(heads, (self.head_dim,), norm.weight, norm.variance_epsilon))

    def _attention(self, layer: int, q: torch.Tensor, width: int, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(q·[prompt keys; generated keys]ᵀ·scale + bias)·[prompt values; generated values] for each row,
        [rows, heads·hd]. q [rows, heads, 1, hd]; query head h reads kv head h // (heads / kv_heads)."""
        rows, groups, n = self.active, self.active_groups, self.n
        kv, per_kv, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        P = self.prompt_width
        queries = q.reshape(rows, kv, per_kv, hd)
        # the prompt part on the [prompt slot, n rows] grid: [groups, kv, n·per_kv, hd] @ [groups, kv, hd, P]
        grid = self._to_grid(queries)
        grid = grid.view(groups, n, kv, per_kv, hd).transpose(1, 2).reshape(groups, kv, n * per_kv, hd)
        prompt_scores = torch.matmul(grid, self.prompt_keys[layer][:groups].transpose(-1, -2))
        prompt_scores = self._from_grid(
            prompt_scores.view(groups, kv, n, per_kv, P).transpose(1, 2).reshape(groups * n, kv, per_kv, P))
        generated_scores = torch.matmul(queries, self.keys[layer][:rows, :, :width].transpose(-1, -2))
        scores = torch.cat([prompt_scores, generated_scores], -1).float() * scale + bias
        probs = scores.softmax(-1).to(q.dtype)
        prompt_probs, generated_probs = probs.split([P, width], -1)
        grid_probs = self._to_grid(prompt_probs)
        grid_probs = grid_probs.view(groups, n, kv, per_kv, P).transpose(1, 2).reshape(groups, kv, n * per_kv, P)
        prompt_out = torch.matmul(grid_probs, self.prompt_values[layer][:groups])        # [groups, kv, n·per_kv, hd]
        prompt_out = prompt_out.view(groups, kv, n, per_kv, hd).transpose(1, 2).reshape(groups * n, kv, per_kv, hd)
        out = self._from_grid(prompt_out) + torch.matmul(generated_probs, self.values[layer][:rows, :, :width])
        return out.reshape(rows, self.heads * hd)

    def _to_grid(self, per_row: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [groups·n, ...]: row r at grid slot grid_slot[r], zeros at the slots no row holds."""
        if self.active == self.rows:  # the full batch: row g·n + k is slot g·n + k
            return per_row
        grid = per_row.new_zeros(self.active_groups * self.n, *per_row.shape[1:])
        return grid.index_copy_(0, self.grid_slot[:self.active], per_row)

    def _from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        return grid if self.active == self.rows else grid.index_select(0, self.grid_slot[:self.active])

    # ------------------------------------------------------------------------------------------------------
    # CUDA graphs: one capture per (active rows, width bucket), replayed for every such step of every rollout

    def graphed_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                     written: int) -> torch.Tensor:
        """`step` at the width bucket of `written` (= slot + 1, known on the host), replayed from a CUDA graph captured on its first use. A graph holds
        the addresses of the weights, the caches (compaction moves rows within them) and its static inputs:
        optimizer steps update the weights in place, so it stays valid across training steps (not under ZeRO-3,
        whose gathered weights are new tensors each time)."""
        key = (self.active, width_bucket(written, self.capacity))
        if key not in self.graphs:
            self.graphs[key] = self._capture(tokens, positions, slot, key[1])
        graph, static_tokens, static_positions, static_slot, static_logits = self.graphs[key]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        static_slot.copy_(slot)
        graph.replay()
        return static_logits

    def _capture(self, tokens, positions, slot, width: int) -> tuple:
        static = (tokens.clone(), positions.clone(), slot.clone())
        # warm-up and capture write slot `slot` of every active row's cache: the same values the real step writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, kernels) must happen outside the capture
                self.step(*static, width=width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.graph_pool is None:  # one memory pool for all of them: they replay one at a time
            self.graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self.step(*static, width=width)
        return (graph, *static, logits)
