"""Where TRL's PAPOTrainer (trl 1.7.1, `trl.experimental.papo`) computes something else than papo-engine, shown on
the same batch: TRL's real methods (`_mask_image`, `_compute_loss`, `_get_per_token_logps_and_entropies`) on a
real PAPOTrainer around the tiny Qwen2.5-VL, against our `masking`, `algorithms.losses` and
`actor.response_token_stats` on a copy of the same weights.

TRL is a benchmark-only dependency: these tests run where it is installed (`bash benchmarks/setup_trl_env.sh`,
then `.venv-trl/bin/python -m pytest tests/test_trl_semantics.py`) and are skipped elsewhere.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("torchvision")

from papo_engine.actor import SequenceBatch, response_token_stats  # noqa: E402
from papo_engine.algorithms.losses import LossInputs, papo_loss, perception_kl  # noqa: E402
from papo_engine.batching import repeat_prompts  # noqa: E402
from papo_engine.config import AlgoConfig, Config  # noqa: E402
from papo_engine.data import GeneratedDataset  # noqa: E402
from papo_engine.head import FusedLMHead  # noqa: E402
from papo_engine.masking import QWEN_IMAGE_MEAN, QWEN_IMAGE_STD, black_value, mask_pixel_values  # noqa: E402
from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer  # noqa: E402
from papo_engine.models import mm_token_type_ids  # noqa: E402
from papo_engine.prompts import FORMAT_INSTRUCTION, SYSTEM_PROMPT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trl_runner import make_processor  # noqa: E402  (the processor the benchmark gives TRL)

PROMPTS, N, R = 2, 2, 6
LENGTHS = [6, 3, 5, 2]  # response lengths: rows 1-3 are right-padded, as TRL pads completions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(TRL PAPOTrainer, its model, our model with the same weights and our fused head, our batch, TRL's inputs)."""
    from datasets import Dataset
    from trl.experimental.papo import PAPOConfig, PAPOTrainer

    cfg = Config()
    tokenizer = load_tokenizer(cfg.model)
    processor = load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    ours = copy.deepcopy(model)
    FusedLMHead.replace_in(ours, fused=True, backend="torch")
    samples = [GeneratedDataset("shape_color", "train", 16, seed=0, image_size=56)[i] for i in range(PROMPTS)]
    data = Dataset.from_dict({"prompt": [[{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": f"{s.question} {FORMAT_INSTRUCTION}"}]
                                         for s in samples], "image": [s.image for s in samples]})
    args = PAPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=PROMPTS * N,
                      num_generations=N, max_completion_length=R, loss_type="grpo", beta=0.0, bf16=False, mask_ratio=0.6,
                      use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no")
    trainer = PAPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=make_processor(tokenizer, cfg))
    pb = encode_prompts([s.question for s in samples], [[s.image] for s in samples], tokenizer, processor)
    prompts = repeat_prompts(pb, N)
    response_ids = torch.randint(0, 400, (PROMPTS * N, R), generator=torch.Generator().manual_seed(0))
    response_mask = (torch.arange(R)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    batch = SequenceBatch(prompts, response_ids, response_mask)
    ids = torch.cat([prompts.input_ids, response_ids], 1)
    inputs = {"prompt_ids": prompts.input_ids, "prompt_mask": prompts.attention_mask,
              "completion_ids": response_ids, "completion_mask": response_mask.long(),
              "advantages": torch.zeros(PROMPTS * N), "pixel_values": prompts.pixel_values,
              "image_grid_thw": prompts.image_grid_thw, "num_images": [1] * (PROMPTS * N),
              "mm_token_type_ids": mm_token_type_ids(ids, model.config.image_token_id)}
    # one draw of TRL's own default mask ("random"), reused wherever a test needs the same masked branch twice
    torch.manual_seed(0)
    trl_masked = PAPOTrainer._mask_image(trainer, prompts.pixel_values, 0.6)
    return trainer, model, ours, batch, inputs, trl_masked


def trl_loss(trainer, inputs, *, gamma=0.0, eta=(0.0, 0.0), accumulation=1, advantages=None, masked=None):
    """TRL's `PAPOTrainer._compute_loss` on a copy of `inputs` with the given weights (the masked images: `masked`,
    else TRL's own masking)."""
    trainer.perception_loss_weight, (trainer.der_loss_weight1, trainer.der_loss_weight2) = gamma, eta
    trainer.current_gradient_accumulation_steps = accumulation
    if masked is not None:
        trainer._mask_image = lambda pixel_values, mask_ratio=None: masked.clone()
    try:
        batch = dict(inputs)
        if advantages is not None:
            batch["advantages"] = advantages
        return trainer._compute_loss(trainer.model, batch)
    finally:
        trainer.__dict__.pop("_mask_image", None)


def trl_logps(trainer, inputs, pixel_values, with_mm_token_type_ids=False):
    """Per-token log-probs and entropies as TRL's PAPO `_compute_loss` gets them (or, with_mm_token_type_ids, as
    GRPOTrainer's `_compute_loss` does: it passes mm_token_type_ids)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if with_mm_token_type_ids else {}
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, att, R, compute_entropy=True, pixel_values=pixel_values,
        image_grid_thw=inputs["image_grid_thw"], num_images=inputs["num_images"], **extra)
    return logps, entropies


def test_prompts_tokenize_identically(setup):
    """Not a difference: the benchmark's processor gives TRL our prompt tokens exactly (TRL's `_tokenize_prompts`
    vs our `encode_prompts`), the same image grid and the same pixel values (torchvision vs PIL processing)."""
    trainer, _, _, batch, _, _ = setup
    from trl.data_utils import prepare_multimodal_messages
    data = trainer.train_dataset
    prompts = [prepare_multimodal_messages(data[i]["prompt"], images=[data[i]["image"]]) for i in range(PROMPTS)]
    prompt_ids, _, fields = trainer._tokenize_prompts(prompts)
    ours = batch.prompts
    for i in range(PROMPTS):
        row = ours.input_ids[i * N][ours.attention_mask[i * N].bool()]
        assert prompt_ids[i] == row.tolist()
    assert torch.equal(fields["image_grid_thw"], ours.image_grid_thw[::N])
    rows = int(ours.image_grid_thw[0].prod())
    assert torch.allclose(fields["pixel_values"][:rows], ours.pixel_values[:rows], atol=1e-5)


def test_a_perception_and_entropy_terms_average_over_padding_and_ignore_accumulation(setup):
    """TRL: loss = (pg − γ·KL_prcp + η1·H + η2·H_mask).mean() over ALL [B, T] completion positions — padding
    included — and, unlike its pg term, not divided by the gradient-accumulation count. Ours: a token-mean over
    response tokens, with the global normalizer (tokens × accumulation steps), so micro-batches sum to the batch
    loss. Shown with advantages 0 (the pg term is 0) on a batch where 8 of 24 positions are padding."""
    trainer, _, _, batch, inputs, masked = setup
    mask = batch.response_mask
    tokens = mask.sum()
    with torch.no_grad():
        logp, ent = trl_logps(trainer, inputs, inputs["pixel_values"])
        mlogp, ment = trl_logps(trainer, inputs, masked)
        kl = perception_kl(logp, mlogp, "k3", clamp=0.2)
        assert kl[mask == 0].abs().sum() > 0 and ent[mask == 0].min() > 0  # padding positions carry values
        for gamma, eta in ((0.5, (0.0, 0.0)), (0.0, (0.3, 0.7))):  # the perception term, then the entropy terms
            cfg = AlgoConfig(gamma=gamma, eta_orig=eta[0], eta_mask=eta[1], perception_kl="k3",
                             perception_kl_clamp=0.2, entropy_form="full")
            per_token = -gamma * kl + eta[0] * ent + eta[1] * ment
            for accumulation in (1, 4):
                trl = trl_loss(trainer, inputs, gamma=gamma, eta=eta, accumulation=accumulation, masked=masked)
                assert torch.allclose(trl, per_token.mean(), rtol=1e-5)  # all 24 positions, any accumulation
                ours, _ = papo_loss(LossInputs(logp, logp, mask, torch.zeros(len(mask)), masked_logprobs=mlogp,
                                               entropy=ent, masked_entropy=ment), cfg, gamma,
                                    token_normalizer=tokens * accumulation)
                assert torch.allclose(ours, (per_token * mask).sum() / tokens / accumulation, rtol=1e-5)
                if gamma or accumulation > 1:  # (random-init entropies are ~log V everywhere, padding included)
                    assert not torch.allclose(trl, ours, rtol=1e-2)
                print(f"\n(a) gamma {gamma}, eta {eta}, accumulation {accumulation}: TRL {trl.item():.6g} "
                      f"(mean over 24 positions), ours {ours.item():.6g} (16 response tokens x accumulation)")


def test_b_patch_and_grid_masks_leave_qwen_pixel_values_unchanged(setup):
    """TRL's mask_type="patch" and "grid" only handle 4-D/5-D [B, C, H, W] images; Qwen2.5-VL's pixel_values are
    2-D [patches, 1176], returned unchanged — the masked pass is paid for, and the perception KL is exactly 0.
    Ours masks whole 28-px merge units of the same 2-D tensor (60% of them here)."""
    trainer, _, ours, batch, inputs, _ = setup
    pixel_values = inputs["pixel_values"]
    try:
        for mask_type in ("patch", "grid"):
            trainer.mask_type = mask_type
            assert torch.equal(trainer._mask_image(pixel_values, 0.6), pixel_values)
            with torch.no_grad():  # advantages 0, η 0: the loss is the perception term alone — exactly 0
                assert trl_loss(trainer, inputs, gamma=0.5).item() == 0.0
    finally:
        trainer.mask_type = "random"
    masked, units = mask_pixel_values(pixel_values, batch.prompts.image_grid_thw, 0.6,
                                      generator=torch.Generator().manual_seed(1))
    changed_rows = (masked != pixel_values).any(1).float().mean().item()
    assert units.any() and changed_rows > 0.3
    with torch.no_grad():
        stats = response_token_stats(ours, SequenceBatch(batch.prompts, batch.response_ids, batch.response_mask,
                                                         masked), both_branches=True, temperature=1.0)
    assert (stats["kl"] * batch.response_mask).sum() > 0
    print(f"\n(b) TRL patch/grid: masked == input, loss 0.0; ours: {changed_rows:.0%} of patch rows masked, "
          f"mean KL {(stats['kl'] * batch.response_mask).sum().item() / batch.response_mask.sum().item():.2e}")


def test_c_random_mask_fills_the_channel_mean_not_black(setup):
    """TRL's default mask_type="random" zeroes individual NORMALIZED values: 0 is the channel mean (a mid grey,
    ≈ (123, 117, 104) in 0-255), scattered value by value across every patch. Ours sets whole merge units to the
    normalized value of a black pixel, (0 − mean_c)/std_c ≈ (−1.79, −1.75, −1.48)."""
    _, _, _, batch, inputs, trl_masked = setup
    pixel_values = inputs["pixel_values"]
    changed = trl_masked != pixel_values
    assert (trl_masked[changed] == 0).all()
    fraction = changed.float().mean().item()
    partial_rows = (changed.any(1) & ~changed.all(1)).float().mean().item()
    assert 0.5 < fraction < 0.7 and partial_rows == 1.0  # every patch row partly masked, value by value
    grey = [255 * m for m in QWEN_IMAGE_MEAN]  # what normalized 0 decodes to
    assert all(100 < g < 130 for g in grey)
    ours, _ = mask_pixel_values(pixel_values, batch.prompts.image_grid_thw, 0.6,
                                generator=torch.Generator().manual_seed(1))
    rows = (ours != pixel_values).any(1)
    black = black_value(QWEN_IMAGE_MEAN, QWEN_IMAGE_STD).repeat_interleave(pixel_values.shape[1] // 3)
    assert rows.any() and torch.equal(ours[rows], black.expand(int(rows.sum()), -1))
    decoded = black_value(QWEN_IMAGE_MEAN, QWEN_IMAGE_STD) * torch.tensor(QWEN_IMAGE_STD) + torch.tensor(
        QWEN_IMAGE_MEAN)
    assert decoded.abs().max() < 1e-6  # black
    print(f"\n(c) TRL: {fraction:.1%} of values set to 0 (= grey {[round(g) for g in grey]}), "
          f"{partial_rows:.0%} of rows partly masked; ours: {rows.float().mean().item():.0%} of rows set to "
          f"black {black_value(QWEN_IMAGE_MEAN, QWEN_IMAGE_STD).tolist()}")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_d_entropy_terms_move_trl_loss_but_not_its_gradient(setup):
    """TRL computes entropies under torch.no_grad(): with η1 = η2 = 0.5 the loss value moves, the gradient stays
    bit-identical to η = 0 — the double-entropy regularizer does nothing to training. Ours (entropy_form="full",
    the fused head's entropies carry autograd) changes the gradient."""
    trainer, model, ours_model, batch, inputs, masked = setup
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    losses, grads = {}, {}
    for eta in ((0.0, 0.0), (0.5, 0.5)):
        model.zero_grad(set_to_none=True)
        loss = trl_loss(trainer, inputs, gamma=0.02, eta=eta, advantages=advantages, masked=masked)
        loss.backward()
        losses[eta], grads[eta] = loss.item(), _grads(model)
    assert abs(losses[(0.5, 0.5)] - losses[(0.0, 0.0)]) > 1.0  # entropies ≈ 6 nats: the logged loss moves by ~6
    assert grads[(0.0, 0.0)].keys() == grads[(0.5, 0.5)].keys()
    assert all(torch.equal(grads[(0.0, 0.0)][k], grads[(0.5, 0.5)][k]) for k in grads[(0.0, 0.0)])
    mask = batch.response_mask
    seqs = SequenceBatch(batch.prompts, batch.response_ids, mask, masked)
    ours_grads = {}
    for eta in (0.0, 0.5):
        ours_model.zero_grad(set_to_none=True)
        stats = response_token_stats(ours_model, seqs, both_branches=True, temperature=1.0)
        cfg = AlgoConfig(gamma=0.02, eta_orig=eta, eta_mask=eta, entropy_form="full")
        loss, _ = papo_loss(LossInputs(stats["logprobs"], stats["logprobs"].detach(), mask, advantages,
                                       masked_logprobs=stats["masked_logprobs"], entropy=stats["entropy"],
                                       masked_entropy=stats["masked_entropy"], full_kl=stats["kl"]), cfg, 0.02)
        loss.backward()
        ours_grads[eta] = _grads(ours_model)
    diff = max((ours_grads[0.5][k] - ours_grads[0.0][k]).abs().max().item() for k in ours_grads[0.0])
    assert diff > 1e-6
    print(f"\n(d) TRL loss {losses[(0.0, 0.0)]:.4f} -> {losses[(0.5, 0.5)]:.4f} with eta 0 -> 0.5, gradients "
          f"identical; ours: gradient changes by up to {diff:.2e}")


def test_e_papo_forwards_drop_mm_token_type_ids(setup):
    """TRL's PAPO `_compute_loss` calls `_get_per_token_logps_and_entropies` without mm_token_type_ids (its
    GRPO `_compute_loss` passes them), so Qwen2.5-VL builds 1-D text positions instead of M-RoPE positions for
    the image tokens: the log-probs differ from the model's own. Ours always passes them and matches the
    M-RoPE log-probs."""
    from trl import GRPOTrainer
    trainer, _, ours, batch, inputs, masked = setup
    seen = []
    real = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mm_token_type_ids"))
        return real(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = spy
    try:
        with torch.no_grad():
            trl_loss(trainer, inputs, gamma=0.02, masked=masked)
            papo_calls = list(seen)
            seen.clear()
            GRPOTrainer._compute_loss(trainer, trainer.model, dict(inputs))
    finally:
        del trainer._get_per_token_logps_and_entropies
    assert len(papo_calls) == 2 and all(x is None for x in papo_calls)
    assert seen and all(x is not None for x in seen)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        papo_lp, _ = trl_logps(trainer, inputs, inputs["pixel_values"])
        mrope_lp, _ = trl_logps(trainer, inputs, inputs["pixel_values"], with_mm_token_type_ids=True)
        ours_lp = response_token_stats(ours, batch, both_branches=False, temperature=1.0)["logprobs"]
    gap = (papo_lp - mrope_lp)[mask].abs().max().item()
    assert gap > 1e-4
    assert torch.allclose(ours_lp[mask], mrope_lp[mask], atol=1e-5)
    print(f"\n(e) TRL PAPO log-probs differ from the M-RoPE ones by up to {gap:.2e}; ours match them to "
          f"{(ours_lp - mrope_lp)[mask].abs().max().item():.1e}")


def test_f_trl_overwrites_the_batch_pixel_values(setup):
    """TRL writes the masked images into the batch dict it was given (`inputs["pixel_values"] = masked`): after the
    loss, the batch's images are the masked ones. Ours keeps them apart (SequenceBatch.masked_pixel_values)."""
    trainer, _, _, _, inputs, masked = setup
    batch = dict(inputs)
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch)
    assert not torch.equal(batch["pixel_values"], inputs["pixel_values"])
    assert (batch["pixel_values"] == 0).float().mean() > 0.5
