import numpy as np
import pytest
import torch

from papo_engine.data import ANSWERS, COLORS, GeneratedDataset, chance_accuracy
from papo_engine.models import encode_prompts, mm_token_type_ids
from papo_engine.prompts import chat_prompt, expand_image_pads


def test_dataset_is_deterministic_and_splits_differ():
    a = GeneratedDataset("shape_color", "train", 50, seed=3, image_size=56)
    b = GeneratedDataset("shape_color", "train", 50, seed=3, image_size=56)
    ev = GeneratedDataset("shape_color", "eval", 50, seed=3, image_size=56)
    for i in range(10):
        assert np.array_equal(np.asarray(a[i].image), np.asarray(b[i].image)) and a[i].answer == b[i].answer
    train_pixels = {np.asarray(a[i].image).tobytes() for i in range(50)}
    assert not any(np.asarray(ev[i].image).tobytes() in train_pixels for i in range(50))


def test_answers_need_the_image():
    ds = GeneratedDataset("shape_color", "train", 400, seed=0, image_size=56)
    by_question = {}
    for i in range(len(ds)):
        by_question.setdefault(ds[i].question, set()).add(ds[i].answer)
    # every question text appears with every answer: the text alone gives chance accuracy
    assert all(answers == set(ANSWERS["shape_color"]) for answers in by_question.values())
    assert chance_accuracy("shape_color") == 1 / len(COLORS)
    # the answer's colour is the most common non-background pixel colour
    sample = ds[0]
    pixels = np.asarray(sample.image).reshape(-1, 3)
    assert (np.abs(pixels - np.array(COLORS[sample.answer])).sum(1) < 5).mean() > 0.1


def test_count_task_answers_match_drawn_shapes():
    ds = GeneratedDataset("shape_count", "train", 30, seed=1, image_size=56)
    assert {ds[i].answer for i in range(30)} <= set(ANSWERS["shape_count"])


def test_expand_image_pads_counts(tiny):
    text = chat_prompt(tiny[1], "q?", num_images=2)
    out = expand_image_pads(text, [3, 5])
    assert out.count("<|image_pad|>") == 8
    with pytest.raises(ValueError, match="2 <|image_pad|> placeholders but 1 images".replace("|", "\\|")):
        expand_image_pads(text, [3])


def test_encode_prompts_layout(tiny):
    cfg, tokenizer, processor, model = tiny
    ds = GeneratedDataset("shape_color", "train", 4, seed=0, image_size=56)
    samples = [ds[i] for i in range(4)]
    pb = encode_prompts([s.question for s in samples], [[s.image] for s in samples], tokenizer, processor)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens_per_image = (pb.image_grid_thw.prod(-1) // 4).tolist()
    assert (pb.input_ids == image_id).sum(1).tolist() == tokens_per_image
    assert pb.pixel_values.shape[0] == int(pb.image_grid_thw.prod(-1).sum())
    assert torch.equal(mm_token_type_ids(pb.input_ids, image_id), (pb.input_ids == image_id).int())
    assert (pb.attention_mask[:, -1] == 1).all()  # left padding: prompts end at the right edge


def test_tiny_model_round_trip(tiny, tmp_path):
    cfg, tokenizer, processor, model = tiny
    from transformers import Qwen2_5_VLForConditionalGeneration
    model.save_pretrained(tmp_path)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
