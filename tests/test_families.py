"""Qwen3-VL and Qwen3.5 beside Qwen2.5-VL, each on a tiny model built from its config: the registry (architectures,
checkpoints by config.json's model_type, one line for an unsupported one), the chat template and the 32-px image
tokens of the encoding, masking on the family's patch grid (and the raw-image mode), the ONE forward over
[original; masked] with the shared-prompt cache (Qwen3.5: its linear-attention states) against full forwards and
eager logits, HF generate, and the native decode for Qwen3-VL (tokens equal HF's under keyed sampling; its C++ step
equal to the torch reference; Qwen3.5 refused with one line). Trainings, ranks, checkpoints, export, eval:
tests/test_family_runs.py."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from papo_engine.actor import SequenceBatch, final_hidden, prefill, prompt_positions, response_token_stats
from papo_engine.batching import repeat_prompts
from papo_engine.config import ConfigError, ModelConfig, load_config
from papo_engine.data import GeneratedDataset
from papo_engine.families import FAMILIES, architecture_names, family_for, family_of
from papo_engine.head import FusedLMHead
from papo_engine.masking import black_value, mask_per_prompt, mask_pixel_values, mask_raw_per_prompt
from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer
from papo_engine.prompts import chat_prompt
from papo_engine.rollout.base import SamplingParams
from papo_engine.rollout.decoder import TextDecoder
from papo_engine.rollout.hf import HFRollout
from papo_engine.rollout.native import NativeRollout

from model_copies import eos_prone
from test_actor import stats_and_gradients
from test_masking import _CountingProcessor, _changed_rows, _image, _process
from test_native_rollout import mixed_prompts

# tiny shapes: text hidden 64 (2 heads of 32 — a head size vLLM's CPU attention takes — 1 KV head), 2 layers
# (Qwen3.5: linear attention, then full attention); vision depth 1
TINY = ["data.image_size=64", "rollout.backend=hf", "model.hidden_size=64", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=128", "model.vision_depth=1", "model.vision_hidden_size=32"]
ARCHITECTURES = {"qwen3_vl": "tiny-qwen3-vl", "qwen3_5": "tiny-qwen3.5"}


def family_setup(architecture: str, *overrides):
    """(cfg, tokenizer, image processor, model with the fused head) of a tiny model of the family."""
    cfg = load_config(None, [f"model.architecture={architecture}", *TINY, *overrides])
    tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    return cfg, tokenizer, processor, model


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family(request):
    """Per family: its setup and the mixed prompts (4 prompts, one with two images; 56- and 84-px images, which the
    processor takes to 64 and 96 px: 2×2 and 3×3 image tokens)."""
    cfg, tokenizer, processor, model = family_setup(ARCHITECTURES[request.param])
    return request.param, tokenizer, processor, model, mixed_prompts(tokenizer, processor)


# ----------------------------------------------------------------------------------------------------------
# the registry and model loading


def test_every_architecture_builds_its_familys_model_type():
    assert set(FAMILIES) == {"qwen2_5_vl", "qwen3_vl", "qwen3_5"}
    tokenizer = load_tokenizer(load_config(None, []).model)
    for name in architecture_names():
        mcfg = ModelConfig(architecture=name)
        config = family_for(mcfg).build_config(mcfg, tokenizer)
        assert config.model_type == family_for(mcfg).model_type, name
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


# parameter counts of the released shapes (meta tensors: no memory), and their vocabularies
RELEASED = {"qwen3-vl-4b": (151936, True), "qwen3.5-0.8b": (248320, True), "qwen3.5-9b": (248320, False)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_architectures_have_their_checkpoints_shapes(name):
    vocab, tied = RELEASED[name]
    tokenizer = load_tokenizer(load_config(None, []).model)
    mcfg = ModelConfig(architecture=name)
    family = family_for(mcfg)
    with torch.device("meta"):
        model = family.model_class(family.build_config(mcfg, tokenizer))
    assert model.lm_head.weight.shape[0] == vocab
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    text = model.config.get_text_config()
    assert text.max_position_embeddings == 262144
    if family.model_type == "qwen3_5":  # three linear-attention layers, then one full-attention layer
        assert text.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]


def test_a_checkpoint_loads_by_its_model_type(family, tmp_path):
    """model.path: the family's class and the same weights, no architecture flag; an unsupported model_type is one
    line naming it and the supported ones."""
    name, tokenizer, processor, model, prompts = family
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = load_config(None, [f"model.path={tmp_path / 'model'}", "rollout.backend=hf"])
    loaded = load_policy(cfg.model, load_tokenizer(cfg.model))
    assert type(loaded) is type(model) and family_of(loaded).model_type == name
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_image_processor(cfg).patch_size == 16  # no processor file saved: the family's grid
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.path={tmp_path / 'model'}"])
    message = str(err.value)
    assert "model_type 'llava' is not supported" in message and "\n" not in message
    assert all(t in message for t in ("qwen2_5_vl", "qwen3_vl", "qwen3_5"))


def test_image_size_and_native_backend_checked_per_family():
    with pytest.raises(ConfigError, match=r"data.image_size=56: must be a multiple of 32 .*Qwen3-VL"):
        load_config(None, ["model.architecture=tiny-qwen3-vl"])
    with pytest.raises(ConfigError, match=r"^rollout.backend=native: Qwen3.5's .* use rollout.backend=hf$"):
        load_config(None, ["model.architecture=tiny-qwen3.5", "data.image_size=64"])


# ----------------------------------------------------------------------------------------------------------
# encoding and masking on the family's grid


def test_chat_template_and_32px_image_tokens(family):
    """No default system turn (Qwen2.5-VL's template adds one); a 64-px image is 2×2 tokens of 32 px, a 96-px one
    3×3, each token 4 patches of 16 px; the rows are [C·T·16·16]."""
    name, tokenizer, processor, model, prompts = family
    assert chat_prompt(tokenizer, "q?", 1).startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert prompts.image_grid_thw.tolist() == [[1, 4, 4], [1, 6, 6], [1, 4, 4], [1, 4, 4], [1, 6, 6]]
    assert prompts.pixel_values.shape == (16 + 36 + 16 + 16 + 36, 3 * 2 * 16 * 16)
    pads = (prompts.input_ids == model.config.image_token_id).sum(1).tolist()
    assert pads == [4, 9, 4, 4 + 9]


def test_prompts_are_the_familys_processor_output(family):
    """Our encoding (the chat template rendered, pads expanded by hand, the PIL image processor) = transformers' own
    Qwen3VLProcessor (Qwen3.5's too) over the same texts and images: ids, attention mask, pixel values, grid."""
    pytest.importorskip("torchvision")  # the processor's video half needs it (installed with vllm)
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    name, tokenizer, processor, model, _ = family
    small = GeneratedDataset("shape_color", "train", 2, 0, 64)
    large = GeneratedDataset("shape_color", "train", 2, 1, 96)
    questions = [small[0].question, "Compare the two shapes."]
    images = [[large[0].image], [small[1].image, large[1].image]]
    ours = encode_prompts(questions, images, tokenizer, processor)
    hf = Qwen3VLProcessor(image_processor=processor, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                          chat_template=tokenizer.chat_template)
    texts = [chat_prompt(tokenizer, q, len(ims)) for q, ims in zip(questions, images)]
    theirs = hf(text=texts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(theirs[key], getattr(ours, key)), key


@pytest.fixture(scope="module")
def grid_processor():
    return load_image_processor(load_config(None, ["model.architecture=tiny-qwen3-vl", "data.image_size=64",
                                                   "data.min_pixels=784"]))


def test_a_32px_block_of_the_image_is_one_merge_unit(grid_processor):
    """Blacking out the 32×32 block (i, j) of a raw 96×128 image changes exactly rows 4u..4u+3 (u = i·4 + j), and
    mask_pixel_values' black for that unit is the processor's (−1 with mean = std = 0.5)."""
    arr = _image(h=96, w=128)
    pv, thw = _process(grid_processor, [arr])
    assert thw.tolist() == [[1, 6, 8]]
    black = black_value(grid_processor.image_mean, grid_processor.image_std)
    assert torch.equal(black, torch.full((3,), -1.0))
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        arr2 = arr.copy()
        arr2[32 * i:32 * (i + 1), 32 * j:32 * (j + 1)] = 0
        pv2, _ = _process(grid_processor, [arr2])
        u = i * 4 + j
        assert _changed_rows(pv, pv2) == [4 * u, 4 * u + 1, 4 * u + 2, 4 * u + 3]
    masked, units = mask_pixel_values(pv, thw, 0.5, generator=torch.Generator().manual_seed(0),
                                      image_mean=grid_processor.image_mean, image_std=grid_processor.image_std)
    assert _changed_rows(pv, masked) == units.repeat_interleave(4).nonzero().flatten().tolist()
    assert (masked[units.repeat_interleave(4)] == -1).all()


def test_raw_mask_on_the_16px_grid_equals_the_processor_pass(grid_processor):
    """mask.space=raw: squares of the raw image; RGB images the processor takes at their own size are masked in
    the original rows, bit for bit what processing the masked image gives (the resized one goes through it)."""
    images = [[Image.fromarray(_image(seed=5, h=64, w=96))], [Image.fromarray(_image(seed=6, h=50, w=70))]]
    pv, thw = _process(grid_processor, [np.array(ims[0]) for ims in images])

    def gens():
        return [torch.Generator().manual_seed(40 + k) for k in range(2)]

    want, _, squares = mask_raw_per_prompt(images, thw, 2, 0.6, 14, grid_processor, gens())
    counting = _CountingProcessor(grid_processor)
    got, _, _ = mask_raw_per_prompt(images, thw, 2, 0.6, 14, counting, gens(), pixel_values=pv)
    assert torch.equal(got, want) and squares.any() and not squares.all()
    assert counting.calls == [1, 1]  # an all-black 96×64 image (the fill), the 50×70 one (resized) processed again


# ----------------------------------------------------------------------------------------------------------
# the training forward and the fused head


def _batch(prompts, processor, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = len(prompts.images_per_prompt)
    response_ids = torch.randint(0, 500, (B * n, 6), generator=gen)
    response_mask = torch.ones(B * n, 6)
    response_mask[0, 4:] = 0
    response_mask[3, 1:] = 0  # a one-token response: a bucket of width 1 below
    masked, _, _ = mask_per_prompt(prompts.pixel_values, prompts.image_grid_thw, n, 0.6, generator=gen,
                                   image_mean=processor.image_mean, image_std=processor.image_std,
                                   images_per_prompt=prompts.images_per_prompt)
    return SequenceBatch(repeat_prompts(prompts, n), response_ids, response_mask, masked)


def _plain_logprobs(model, batch, pixel_values):
    """Reference: the model's logits over whole sequences, log_softmax in float64, gather."""
    p = batch.prompts
    ids = torch.cat([p.input_ids, batch.response_ids], 1)
    hidden = final_hidden(model, ids, torch.cat([p.attention_mask, batch.response_mask.long()], 1), pixel_values,
                          p.image_grid_thw)
    P, R = p.input_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(model.lm_head(hidden).double()[:, P - 1:P - 1 + R], -1)
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


def test_one_forward_over_both_branches_equals_eager_logits(family):
    name, tokenizer, processor, model, prompts = family
    batch = _batch(prompts, processor)
    with torch.no_grad():
        stats = response_token_stats(model.eval(), batch, both_branches=True, temperature=1.0)
        orig = _plain_logprobs(model, batch, batch.prompts.pixel_values)
        masked = _plain_logprobs(model, batch, batch.masked_pixel_values)
    assert torch.allclose(stats["logprobs"].double(), orig, atol=1e-5, rtol=0)
    assert torch.allclose(stats["masked_logprobs"].double(), masked, atol=1e-5, rtol=0)
    assert not torch.allclose(orig, masked, atol=1e-4)  # the mask reaches the policy (Qwen3-VL: and DeepStack)
    assert (stats["kl"][batch.response_mask.bool()] >= -1e-6).all()


def test_shared_prompt_cache_equals_full_forwards_values_and_gradients(family):
    """Each prompt once per branch, its cache expanded to the responses (Qwen3.5: convolution windows and recurrent
    states of the linear-attention layers, keys and values of the full-attention one), in response buckets of
    different widths (one of width 1) = one full forward per sequence, values and every parameter's gradient."""
    name, tokenizer, processor, model, prompts = family
    model.train()

    def run(batch):
        return stats_and_gradients(model, batch)

    plain = _batch(prompts, processor, seed=1)
    grouped = replace(plain, prompt_group=torch.arange(4).repeat_interleave(2))
    buckets = [torch.tensor([3]), torch.tensor([0, 1, 2, 4, 5, 6, 7])]
    (full, full_grads), (shared, shared_grads) = run(plain), run(replace(grouped, response_buckets=buckets))
    for key in full:
        assert torch.allclose(shared[key], full[key], atol=1e-5, rtol=0), key
    assert full_grads.keys() == shared_grads.keys()
    assert any("visual" in k for k in full_grads) and any("lm_head" in k for k in full_grads)
    for key, grad in full_grads.items():
        assert torch.allclose(shared_grads[key], grad, rtol=1e-4, atol=1e-5), key
    model.eval()


# ----------------------------------------------------------------------------------------------------------
# rollouts


@pytest.fixture(scope="module")
def eos_model(family):
    """The family's model with an eos row of lm_head that ends sampled responses at different steps."""
    name, tokenizer, processor, model, prompts = family
    return name, tokenizer, eos_prone(model, tokenizer, prompts).eval(), prompts


def test_hf_rollout_log_probs_are_the_trainers(eos_model):
    """HF generate's keyed samples (eos mid-way): their per-token log-probs under the trainer's forward equal those of
    generate's own scores."""
    name, tokenizer, model, prompts = eos_model
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=4)
    out = HFRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=[0, 1, 2, 3])
    lengths = out.response_mask.sum(1)
    assert (lengths < 8).any() and (lengths == 8).any(), lengths
    batch = SequenceBatch(repeat_prompts(prompts, 2), out.response_ids, out.response_mask,
                          prompt_group=torch.arange(4).repeat_interleave(2))
    with torch.no_grad():
        trainer = response_token_stats(model, batch, both_branches=False, temperature=1.0)["logprobs"]
        plain = _plain_logprobs(model, batch, batch.prompts.pixel_values)
    assert torch.allclose(trainer.double(), plain, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def qwen3_vl_eos():
    """A tiny Qwen3-VL whose eos row of lm_head ends sampled responses at different steps, and the mixed prompts."""
    _, tokenizer, processor, model = family_setup("tiny-qwen3-vl")
    prompts = mixed_prompts(tokenizer, processor)
    return tokenizer, eos_prone(model, tokenizer, prompts).eval(), prompts


CASES = {"T=1": (1.0, 1.0), "T=0.7, top_p=0.8": (0.7, 0.8), "greedy": (0.0, 1.0)}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_vl_native_draws_the_tokens_hf_generate_draws(qwen3_vl_eos, case):
    """Keyed sampling (several images in a prompt, eos mid-way): the native decode's tokens are HF generate's, its
    log-probs the trainer's."""
    tokenizer, model, prompts = qwen3_vl_eos
    temperature, top_p = CASES[case]
    sampling = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=10, seed=11)
    hf = HFRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=[5, 6, 7, 8])
    native = NativeRollout(model, tokenizer, batch_size=8).generate(prompts, sampling, prompt_keys=[5, 6, 7, 8])
    assert torch.equal(native.response_ids, hf.response_ids) and native.texts == hf.texts
    if temperature > 0:
        lengths = native.response_mask.sum(1)
        assert (lengths < 10).any() and (lengths == 10).any(), lengths
        batch = SequenceBatch(repeat_prompts(prompts, 4), native.response_ids, native.response_mask,
                              prompt_group=torch.arange(4).repeat_interleave(4))
        with torch.no_grad():
            trainer = response_token_stats(model, batch, both_branches=False, temperature=temperature)["logprobs"]
        valid = native.response_mask.bool()
        assert torch.allclose(native.logprobs[valid], trainer[valid], atol=1e-5, rtol=0)


def test_qwen3_5_native_rollout_is_refused_in_one_line():
    _, tokenizer, _, model = family_setup("tiny-qwen3.5")
    with pytest.raises(ConfigError, match=r"^rollout.backend=native: .* use rollout.backend=hf$"):
        NativeRollout(model, tokenizer, batch_size=8)


def test_qwen3_5_float32_on_cpu_vllm_is_refused_in_one_line(tmp_path, monkeypatch):
    """vLLM-CPU's Gated DeltaNet runs bfloat16 only (it asserts deep in the first forward); we say so before the
    engine builds. The bfloat16 engine itself: tests/test_vllm_real.py."""
    from types import SimpleNamespace

    import fake_vllm
    from papo_engine.rollout.vllm import VLLMRollout
    cfg, tokenizer, _, model = family_setup("tiny-qwen3.5")
    model.save_pretrained(tmp_path)
    cfg.model.path, cfg.rollout.backend = str(tmp_path), "vllm"
    monkeypatch.setattr(fake_vllm, "platforms", SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: True)))
    with pytest.raises(ConfigError, match=r"^rollout.backend='vllm' on CPU runs Qwen3.5's .* bfloat16 only: set "
                                          r"model.dtype=bfloat16 \(now float32\) or rollout.backend=hf$"):
        VLLMRollout(cfg, tokenizer, vllm_module=fake_vllm)


def test_text_positions_make_the_interleaved_rotary_one_dimensional():
    """After the prompt every M-RoPE component is the same position: Qwen3-VL's interleaved recomposition (and
    Qwen3.5's, on its quarter of the head) then gives the plain 1-D rotary the decode step uses."""
    for architecture in ARCHITECTURES.values():
        model = family_setup(architecture)[3]
        rotary = model.model.language_model.rotary_emb
        assert rotary.config.rope_parameters["mrope_interleaved"]
        positions = torch.tensor([[7, 30, 2047]])
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions.expand(3, 1, 3))
        freqs = positions[0, :, None].float() * rotary.inv_freq
        assert torch.allclose(cos[0], torch.cat([freqs, freqs], -1).cos(), atol=1e-6)
        assert torch.allclose(sin[0], torch.cat([freqs, freqs], -1).sin(), atol=1e-6)
        # a position whose components differ does not: the sections really interleave
        mixed, _ = rotary(torch.zeros(1), torch.tensor([[[7]], [[8]], [[9]]]))
        assert not torch.allclose(mixed[0, 0], cos[0, 0])


def test_cpp_decode_step_equals_the_torch_reference_with_qk_norm(qwen3_vl_eos):
    """Qwen3-VL's decode step on the CPU path (q/k RMS-normalized per head in the packed projection, then the C++
    attention op) gives the torch reference step's logits, step after step."""
    tokenizer, model, prompts = qwen3_vl_eos
    positions = prompt_positions(model, prompts)
    n, B, P = 3, *prompts.input_ids.shape
    reference, fast = TextDecoder(model, B, n, P, 5, kernel="torch"), TextDecoder(model, B, n, P, 5)
    assert fast.cpu_kernel and fast.qk_norm and not reference.cpu_kernel
    with torch.no_grad():
        _, cache = prefill(model, prompts.input_ids, prompts.attention_mask, positions, prompts.pixel_values,
                           prompts.image_grid_thw)
        for decoder in (reference, fast):
            decoder.fill_prompt(cache, prompts.attention_mask)
        start = positions.amax(dim=(0, 2)).repeat_interleave(n) + 1
        tokens = torch.randint(0, 500, (B * n,), generator=torch.Generator().manual_seed(0))
        for t in range(5):
            slot = torch.tensor([t])
            a = reference.step(tokens, start + t, slot, width=t + 1)
            b = fast.step(tokens, start + t, slot, width=t + 1)
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (t, (a - b).abs().max())
            tokens = a.argmax(-1)
