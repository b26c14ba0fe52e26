"""Bad inputs a new user hits (issue 14, items 6, 7, 8, 12, 14): 16-bit images, eval files without training
files, over-long prompts, non-UTF-8 lines and 1-based line numbers, checkpoints' tokenizer and processor files."""
import dataclasses
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from papo_engine.config import Config, ConfigError, load_config
from papo_engine.datasets import _Geometry, load_dataset_files
from papo_engine.models import (TOKENIZER_DIR, encode_prompts, load_image_processor, load_tokenizer,
                                max_positions, prompt_token_limit, saved_image_processor_settings)
from papo_engine.prompts import VISION_TOKENS, vision_token_ids


def _png(size=(56, 56), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _load(tiny, files, prompt_limit=2048, **data):
    _, tokenizer, processor, _ = tiny
    return load_dataset_files(files, dataclasses.replace(tiny[0].data, **data), tokenizer, processor, "train",
                              prompt_limit)


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) = round(v / 257), in integers: v = 257q + r rounds up iff r >= 129."""
    return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# item 6: 16-bit greyscale images


GREY16 = (np.arange(56 * 56, dtype=np.int64).reshape(56, 56) * 20).astype(np.uint16)  # 0 .. 62700


def test_16bit_png_file_is_scaled_not_clipped(tiny, tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "grey16.png")
    reopened = Image.open(tmp_path / "grey16.png")
    assert reopened.mode == "I;16" and np.array_equal(np.asarray(reopened), GREY16)  # a real 16-bit PNG
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "Q?", "answer": "a", "images": ["grey16.png"]}) + "\n")
    image = _load(tiny, [str(tmp_path / "d.jsonl")])[0].images[0]
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    expected = _to_8bit(GREY16)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], expected)
    assert (pixels == 255).mean() < 0.01  # before the fix: all white


def test_other_16bit_modes(tiny):
    geometry = _Geometry(tiny[2])
    expected = _to_8bit(GREY16)
    big_endian = Image.frombytes("I;16B", (56, 56), GREY16.astype(">u2").tobytes())
    int32 = Image.fromarray(GREY16.astype(np.int32))  # how older Pillow versions open 16-bit PNGs
    assert (big_endian.mode, int32.mode) == ("I;16B", "I")
    for source in (big_endian, int32):
        out = np.asarray(geometry.decode(source, base_dir=None))
        assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected), source.mode
    # a tRNS grey value marks transparent pixels: composited onto white like any transparency
    with_trns = Image.fromarray(GREY16)
    with_trns.info["transparency"] = int(GREY16[0, 5])
    out = np.asarray(geometry.decode(with_trns, base_dir=None))[..., 1]
    assert out[0, 5] == 255 and out[0, 4] == expected[0, 4] and out[40, 40] == expected[40, 40]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_16bit_grey_alpha_png(tiny, tmp_path):
    """Colour type 4 at 16 bits, written byte by byte (Pillow cannot write it): grey k*257, alpha on/off."""
    width = height = 56
    grey = (np.arange(width)[None, :].repeat(height, 0) * 4).astype(np.int64)  # 8-bit target values 0..220
    alpha = np.where(np.arange(height)[:, None] < 28, 65535, 0).repeat(width, 1)
    rows = np.stack([grey * 257, alpha], -1).astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    (tmp_path / "la16.png").write_bytes(png)
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "Q?", "answer": "a", "images": ["la16.png"]}) + "\n")
    pixels = np.asarray(_load(tiny, [str(tmp_path / "d.jsonl")])[0].images[0])
    assert np.array_equal(pixels[:28, :, 0], grey[:28].astype(np.uint8))  # opaque: the grey value
    assert (pixels[28:] == 255).all()  # transparent: white


# ----------------------------------------------------------------------------------------------------------
# item 7: data.eval_files without data.train_files


def test_eval_files_without_train_files_refused(tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"data.eval_files=[{data}]"])
    message = str(err.value)
    assert "data.eval_files" in message and "data.train_files" in message and "\n" not in message
    cfg = load_config(overrides=[f"data.eval_files=[{data}]", f"data.train_files=[{data}]", "warmup.steps=0"])
    assert cfg.data.train_files == cfg.data.eval_files == [str(data)]


# ----------------------------------------------------------------------------------------------------------
# item 8: the prompt limit defaults from the model's positions


def _model_dir(tmp_path, positions: int):
    """A model folder with only a config.json: a Qwen2.5-VL config whose text config allows `positions`."""
    from papo_engine.models import tiny_config
    tokenizer = load_tokenizer(Config().model)
    config = tiny_config(Config().model, tokenizer)
    config.text_config.max_position_embeddings = positions
    folder = tmp_path / "model"
    config.save_pretrained(folder)
    return folder


def test_prompt_limit_defaults_from_model_positions(tiny, tmp_path, caplog):
    cfg = Config()
    assert cfg.data.max_prompt_length == 0
    assert prompt_token_limit(cfg) == 2048 - 24  # the tiny model: 2048 positions, 24 new tokens
    folder = _model_dir(tmp_path, positions=200)
    cfg.model.path = str(folder)
    assert max_positions(cfg.model) == 200 and prompt_token_limit(cfg) == 200 - 24
    cfg.rollout.max_new_tokens = 64
    assert prompt_token_limit(cfg) == 136
    cfg.data.max_prompt_length = 150  # an explicit limit wins, with a warning when it overflows the model
    with caplog.at_level(logging.WARNING, logger="papo_engine.models"):
        assert prompt_token_limit(cfg) == 150
    assert "data.max_prompt_length=150 + rollout.max_new_tokens=64 exceed the model's 200 positions" in caplog.text
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = 0, 200
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=200: leaves no room .* 200 positions"):
        prompt_token_limit(cfg)

    # where it bites: a 56x56 image (4 image tokens) fits in 136 tokens, a 336x336 one (144) does not
    Image.new("RGB", (56, 56), "red").save(tmp_path / "small.png")
    Image.new("RGB", (336, 336), "blue").save(tmp_path / "large.png")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"id": name, "problem": "What color?", "answer": "x",
                                                            "images": [f"{name}.png"]})
                                                for name in ("small", "large")) + "\n")
    cfg.rollout.max_new_tokens = 64
    ds = _load(tiny, [str(tmp_path / "d.jsonl")], prompt_limit=prompt_token_limit(cfg))
    assert ds.loaded == 1 and ds[0].uid == "small" and ds.skipped == {"prompt_too_long": 1}
    assert ds.prompt_lengths[0] <= 136


def test_legacy_flat_config_positions(tmp_path):
    """A transformers-4 config.json keeps the text settings at the top level."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "max_position_embeddings": 300,
                                                    "hidden_size": 64, "vision_config": {}}))
    cfg = Config()
    cfg.model.path = str(folder)
    assert max_positions(cfg.model) == 300


# ----------------------------------------------------------------------------------------------------------
# item 12: a non-UTF-8 line is one bad record; line numbers count from 1


def test_non_utf8_line_skipped_and_lines_counted_from_1(tiny, tmp_path, caplog):
    (tmp_path / "x.png").write_bytes(_png())
    good = {"problem": "Q?", "answer": "a", "images": ["x.png"]}
    latin1 = json.dumps({**good, "problem": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1")  # not UTF-8
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**good, "id": "first"}).encode() + b"\n"  # line 1, after a BOM
                     + b"\n"                                                             # line 2: blank
                     + latin1 + b"\n"                                                    # line 3
                     + b"{not json\r\n"                                                  # line 4
                     + json.dumps({**good, "problem": "no id"}).encode() + b"\r\n"       # line 5
                     + json.dumps({**good, "id": "late", "answer": ""}).encode() + b"\n")  # line 6
    with caplog.at_level(logging.WARNING, logger="papo_engine.datasets"):
        ds = _load(tiny, [str(path)])
    assert ds.loaded == 2 and ds.skipped == {"bad_encoding": 1, "bad_json": 1, "missing_answer": 1}
    assert [s.uid for s in (ds[0], ds[1])] == ["first", f"{path}:5"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(f"record {path}:3: bad_encoding (byte 17 of the line" in m for m in warnings) == 1, warnings
    assert sum(f"record {path}:4: bad_json" in m and "column 2" in m for m in warnings) == 1, warnings
    assert sum(f"record late ({path}:6): missing_answer" in m for m in warnings) == 1, warnings
    with pytest.raises(ConfigError, match=rf"data.strict=true: record {path}:3: bad_encoding"):
        _load(tiny, [str(path)], strict=True)

    # a JSON array is one document: a bad byte rejects the file, naming its line
    array = tmp_path / "arr.json"
    latin1 = json.dumps({**good, "problem": "\u00e9"}, ensure_ascii=False).encode("latin-1")
    array.write_bytes(b"[\n" + json.dumps(good).encode() + b",\n" + latin1 + b"\n]")
    with pytest.raises(ConfigError, match=r"arr.json'?: not UTF-8 text \(line 3, byte 14: invalid continuation"):
        _load(tiny, [str(array)])
    array.write_bytes(b"[\n" + json.dumps(good).encode() + b",\n  {oops}\n]")
    with pytest.raises(ConfigError, match=r"arr.json'?: not valid JSON \(Expecting property name .* at line 3, "
                                          r"column 4\)"):
        _load(tiny, [str(array)])


def test_parquet_rows_counted_from_1(tiny, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["one?", "two?"], "answer": ["a", None], "images": [_png(), _png()]}), path)
    with caplog.at_level(logging.WARNING, logger="papo_engine.datasets"):
        ds = _load(tiny, [str(path)])
    assert ds[0].uid == f"{path}:1" and ds.skipped == {"missing_answer": 1}
    assert any(f"record {path}:2: missing_answer" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------------
# item 14: a checkpoint's tokenizer and image-processor files


def _tokenizer_dir(tmp_path, renamed: str):
    """The shipped tokenizer with `renamed` spelled differently: same ids, that token absent; a config.json naming
    the family, whose chat template the tokenizer (it has none) gets."""
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((TOKENIZER_DIR / name).read_text().replace(renamed, "<|reserved_0|>"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return folder


def test_tokenizer_without_vision_pad_generates(tiny, tmp_path):
    from papo_engine.config import ModelConfig
    from papo_engine.rollout.base import SamplingParams
    from papo_engine.rollout.hf import HFRollout

    _, shipped, processor, model = tiny
    tokenizer = load_tokenizer(ModelConfig(path=str(_tokenizer_dir(tmp_path, "<|vision_pad|>"))))
    assert tokenizer.convert_tokens_to_ids("<|vision_pad|>") is None  # what the old list held
    kept = [shipped.convert_tokens_to_ids(t) for t in VISION_TOKENS if t != "<|vision_pad|>"]
    assert vision_token_ids(tokenizer) == kept and vision_token_ids(shipped) == shipped.convert_tokens_to_ids(
        VISION_TOKENS)
    prompts = encode_prompts(["What color?"] * 2, [[Image.new("RGB", (56, 56), "red")]] * 2, tokenizer, processor)
    torch.manual_seed(0)
    out = HFRollout(model, tokenizer, batch_size=4).generate(prompts, SamplingParams(2, 1.0, 1.0, 3))
    assert out.response_ids.shape[0] == 4
    assert not torch.isin(out.response_ids, torch.tensor(kept)).any()


def test_tokenizer_without_image_pad_refused(tmp_path):
    from papo_engine.config import ModelConfig
    with pytest.raises(ConfigError, match=r"model.path=.*tok.*lacks <\|image_pad\|>"):
        load_tokenizer(ModelConfig(path=str(_tokenizer_dir(tmp_path, "<|image_pad|>"))))


def _processor_json(image_processor) -> str:
    """processor_config.json exactly as transformers' ProcessorMixin writes it (the Qwen2.5-VL processor
    itself cannot be built without torchvision, so its serializer runs on an instance holding the parts)."""
    from transformers import Qwen2_5_VLProcessor
    processor = object.__new__(Qwen2_5_VLProcessor)
    processor.image_processor, processor.tokenizer, processor.video_processor = image_processor, None, None
    processor.chat_template = None
    return processor.to_json_string()


LEGACY = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
          "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


@pytest.mark.parametrize("layout", ["preprocessor", "processor", "both", "processor_without_image_processor"])
def test_image_processor_settings_from_each_layout(tmp_path, layout):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    newer = Qwen2VLImageProcessorPil(min_pixels=1024, max_pixels=65536, patch_size=16, image_mean=[0.5] * 3,
                                     image_std=[0.25] * 3)
    if layout in ("preprocessor", "both", "processor_without_image_processor"):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY))
    if layout in ("processor", "both"):
        (tmp_path / "processor_config.json").write_text(_processor_json(newer))
    if layout == "processor_without_image_processor":
        (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    settings, origin = saved_image_processor_settings(tmp_path)
    if layout in ("processor", "both"):  # the nested settings win, as in transformers
        assert origin == str(tmp_path / "processor_config.json")
        assert settings == {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "patch_size": 16, "merge_size": 2,
                            "temporal_patch_size": 2, "min_pixels": 1024, "max_pixels": 65536}
    else:
        assert origin == str(tmp_path / "preprocessor_config.json")
        assert settings == {k: LEGACY[k] for k in ("image_mean", "image_std", "patch_size", "merge_size",
                                                   "temporal_patch_size", "min_pixels", "max_pixels")}
    cfg = Config()
    cfg.model.path = str(tmp_path)
    processor = load_image_processor(cfg)
    assert processor.patch_size == settings["patch_size"]
    assert list(processor.image_mean) == settings["image_mean"] and list(processor.image_std) == settings["image_std"]
    # the pixel range is the run's (data.min_pixels / max_pixels), which the rollout backends use as well
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (cfg.data.min_pixels,
                                                                                   cfg.data.max_pixels)


def test_image_processor_files_bad_or_absent(tmp_path):
    assert saved_image_processor_settings(tmp_path) == ({}, None)
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"patch_size": 1')
    with pytest.raises(ConfigError, match=r"processor_config.json: not valid JSON"):
        saved_image_processor_settings(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# issue 43, items 3, 5 and 11: an image gone during the run, training files without held-out files, the prompt
# limit on the generated task


def test_image_gone_after_the_load_is_replaced_counted_and_named(tiny, tmp_path, caplog):
    from papo_engine.datasets import data_counts
    for name, color in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
        (tmp_path / f"{name}.png").write_bytes(_png(color=color))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": name, "problem": "Q?", "answer": name,
                                                          "images": [f"{name}.png"]}) + "\n" for name in "abc"))
    ds = _load(tiny, [str(tmp_path / "d.jsonl")])
    (tmp_path / "b.png").unlink()  # deleted while the run goes on
    (tmp_path / "c.png").write_bytes(b"\x89PNG truncated")  # overwritten with something that does not decode
    with caplog.at_level(logging.WARNING, logger="papo_engine.datasets"):
        assert [ds[i].uid for i in range(3)] == ["a", "a", "a"]  # b -> c (broken too) -> a; c -> a
    assert ds.replaced == {"missing_image_file": 1, "corrupt_image": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"record b ({tmp_path / 'd.jsonl'}:2): missing_image_file ({tmp_path / 'b.png'}) since the load"
               in m for m in warnings), warnings
    assert any(f"record c ({tmp_path / 'd.jsonl'}:3): corrupt_image ({tmp_path / 'c.png'}:" in m for m in warnings)
    assert data_counts(ds) == {"loaded": 3, "skipped": {}, "replaced": {"missing_image_file": 1, "corrupt_image": 2}}
    (tmp_path / "a.png").unlink()
    with pytest.raises(ConfigError, match=r"train: none of the 3 records' images can be read any more"):
        ds[0]


def test_eval_every_needs_eval_files_with_train_files(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"^trainer.eval_every=5 with data.train_files needs data.eval_files"):
        load_config(overrides=[f"data.train_files=[{data}]", "warmup.steps=0", "trainer.eval_every=5"])


def _train(tmp_path, capsys, *overrides):
    """`papo train` in this process: (exit code, its `papo:` lines on stderr, stdout)."""
    from papo_engine.cli import main
    code = main(["train", f"trainer.output_dir={tmp_path / 'run'}", "logging.wandb=false", "logging.plot=false",
                 *overrides])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.startswith("papo:")], out


@pytest.mark.slow  # a 1-step training in this process (~10 s)
def test_training_files_without_eval_files_are_not_evaluated_on_another_task(tiny, tmp_path, capsys):
    from papo_engine.data import GeneratedDataset
    rows = []
    for i in range(4):
        sample = GeneratedDataset("shape_color", "train", 4, 5, 56)[i]
        sample.image.save(tmp_path / f"{i}.png")
        rows.append({"problem": sample.question, "answer": sample.answer, "images": [f"{i}.png"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, lines, out = _train(tmp_path, capsys, f"data.train_files=[{tmp_path / 'train.jsonl'}]", "warmup.steps=0",
                              "trainer.steps=1", "trainer.prompts_per_step=4", "rollout.n=2",
                              "rollout.max_new_tokens=4", "trainer.save_every=0", "trainer.save_final=false")
    assert code == 0, lines
    assert "papo: data.eval_files is empty: no held-out evaluation at the end" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_accuracy"] is None and "chance_accuracy" not in summary
    assert summary["eval"].startswith("not run: data.train_files without data.eval_files")


def test_generated_prompts_fit_the_prompt_limit(tiny):
    from papo_engine.data import GeneratedDataset
    from papo_engine.datasets import check_generated_prompts_fit
    from papo_engine.hint_task import HintDataset
    _, tokenizer, processor, _ = tiny
    for task, dataset in (("shape_color", GeneratedDataset("shape_color", "train", 64, 0, 56)),
                          ("shape_color_hint", HintDataset("train", 64, 0, 56, 0.7))):
        lengths = [int(encode_prompts([s.question], [s.images], tokenizer, processor).attention_mask.sum())
                   for s in (dataset[i] for i in range(len(dataset)))]
        data = dataclasses.replace(Config().data, task=task, max_prompt_length=max(lengths))
        check_generated_prompts_fit(data, tokenizer, processor)  # the longest prompt drawn fits exactly
        data.max_prompt_length = max(lengths) - 1
        with pytest.raises(ConfigError, match=rf"^data.max_prompt_length={max(lengths) - 1}: the generated task "
                                              rf"'{task}' at data.image_size=56 has prompts of up to {max(lengths)} "
                                              rf"tokens"):
            check_generated_prompts_fit(data, tokenizer, processor)


@pytest.mark.slow  # builds the trainer in this process (~5 s)
def test_prompt_limit_on_the_generated_task_is_not_ignored(tmp_path, capsys):
    code, lines, _ = _train(tmp_path, capsys, "data.max_prompt_length=10", "warmup.steps=0")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("papo: error: data.max_prompt_length=10: the "
                                                                 "generated task 'shape_color'"), lines
