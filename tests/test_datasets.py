"""Local-file datasets: JSONL / Parquet / save_to_disk sources, bad-record accounting, prompt-length filter."""
import dataclasses
import io
import json
import logging
import os

import pytest
from PIL import Image

from papo_engine.config import ConfigError
from papo_engine.datasets import _Geometry, load_dataset_files, prompt_length
from papo_engine.models import encode_prompts

EXPECTED_SKIPS = {"corrupt_image": 1, "missing_image_file": 1, "missing_answer": 1, "bad_answer_type": 1,
                  "prompt_too_long": 1}


def _png(size=(56, 56), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_gray(size=(56, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "JPEG")
    return buf.getvalue()


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture()
def files(tmp_path):
    """Three sources, 6 good records and exactly one of each bad kind in EXPECTED_SKIPS."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = tmp_path / "imgs"
    img.mkdir()
    (img / "a.png").write_bytes(_png())
    (img / "b.png").write_bytes(_png(color=(30, 30, 200, 120), mode="RGBA"))
    (img / "corrupt.png").write_bytes(os.urandom(300))
    _write_jsonl(tmp_path / "part1.jsonl", [
        {"id": "j0", "problem": "<image>What color is the shape?", "answer": "red", "images": ["imgs/a.png"]},
        {"id": "j1", "problem": "<image>\n<image>\nHow many images?", "answer": 2, "images": ["imgs/a.png",
                                                                                              "imgs/b.png"]},
        {"id": "j2", "problem": "Q?", "answer": "x", "images": ["imgs/corrupt.png"]},
        {"id": "j3", "problem": "Q?", "answer": "x", "images": "imgs/does_not_exist.png"},
        {"id": "j4", "problem": "Q?", "images": ["imgs/a.png"]},
        {"id": "j5", "problem": "Q?", "answer": ["a", "b"], "images": ["imgs/a.png"]},
    ])
    table = pa.table({"problem": ["Parquet one?", "Parquet <image> two?"], "answer": ["p1", "3.5"],
                      "images": pa.array([[_png()], [_jpeg_gray()]], type=pa.list_(pa.binary()))})
    pq.write_table(table, tmp_path / "part2.parquet")
    features = datasets.Features({"id": datasets.Value("string"), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "images": datasets.Image()})
    ds = datasets.Dataset.from_dict({
        "id": ["h0", "h1", "h_big"], "problem": ["HF one?", "HF two?", "Huge image?"], "answer": ["a", "b", "c"],
        "images": [Image.new("RGB", (56, 56), "green"), Image.new("P", (84, 56)),
                   Image.new("RGB", (560, 560), "white")]}, features=features)
    ds.save_to_disk(str(tmp_path / "part3"))
    return [str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.parquet"), str(tmp_path / "part3")]


def _data_cfg(tiny, **kw):
    return dataclasses.replace(tiny[0].data, **kw)


def _load(tiny, files, prompt_limit=200, **kw):
    _, tokenizer, processor, _ = tiny
    return load_dataset_files(files, _data_cfg(tiny, **kw), tokenizer, processor, "train", prompt_limit)


def _encoded_length(sample, tiny):
    _, tokenizer, processor, _ = tiny
    return encode_prompts([sample.question], [sample.images], tokenizer, processor).input_ids.shape[1]


def test_counts_and_samples(tiny, files, caplog):
    with caplog.at_level(logging.WARNING, logger="papo_engine.datasets"):
        ds = _load(tiny, files)
    assert ds.loaded == len(ds) == 6
    assert ds.skipped == EXPECTED_SKIPS
    # one WARNING line per skip naming the record id, plus the summary line
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5 + 1
    for rid, reason in [("j2", "corrupt_image"), ("j3", "missing_image_file"), ("j4", "missing_answer"),
                        ("j5", "bad_answer_type"), ("h_big", "prompt_too_long")]:
        assert sum(f"record {rid} " in m and reason in m for m in warnings) == 1, (rid, warnings)
    assert "loaded 6" in warnings[-1] and "skipped 5" in warnings[-1]

    samples = [ds[i] for i in range(len(ds))]
    parquet = files[1]
    assert [s.uid for s in samples] == ["j0", "j1", f"{parquet}:1", f"{parquet}:2", "h0", "h1"]  # files in order
    assert [s.question for s in samples] == ["What color is the shape?", "How many images?", "Parquet one?",
                                             "Parquet two?", "HF one?", "HF two?"]
    assert [s.answer for s in samples] == ["red", "2", "p1", "3.5", "a", "b"]
    assert [len(s.images) for s in samples] == [1, 2, 1, 1, 1, 1]
    assert all(im.mode == "RGB" for s in samples for im in s.images)
    assert [s.images[-1].size for s in samples] == [(56, 56), (56, 56), (56, 56), (56, 84), (56, 56), (84, 56)]
    assert all(s.caption == "" for s in samples)
    # RGBA is composited onto white: the half-transparent blue becomes light blue, not dark
    r, g, b = samples[1].images[1].getpixel((0, 0))
    assert r > 100 and b > 200
    # decoded lazily: each access decodes again (nothing cached), with identical pixels
    again = ds[0].images[0]
    assert again is not samples[0].images[0] and again.tobytes() == samples[0].images[0].tobytes()
    with pytest.raises(IndexError):
        ds[6]


def test_prompt_lengths_match_encode_prompts(tiny, files):
    _, tokenizer, processor, _ = tiny
    ds = _load(tiny, files)
    for i in range(len(ds)):
        assert ds.prompt_lengths[i] == _encoded_length(ds[i], tiny), i
    # the dropped sample really is longer than the limit, by the same computation
    big = Image.new("RGB", (560, 560), "white")
    n = prompt_length("Huge image?", [big.size], tokenizer, processor)
    assert n == _encoded_length(type(ds[0])([big], "Huge image?", "c", "x"), tiny) and n > 200
    # a limit it fits under: the huge-image record is kept
    unlimited = _load(tiny, files, prompt_limit=n)
    assert unlimited.loaded == 7 and "prompt_too_long" not in unlimited.skipped


def test_large_image_downscaled_to_processor_target(tiny, tmp_path):
    """Above max_pixels the image is resized up front to exactly the processor's own smart-resize target."""
    from papo_engine.models import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    _, tokenizer, _, _ = tiny
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=112 * 112)
    big = Image.new("RGB", (300, 170), "red")
    buf = io.BytesIO()
    big.save(buf, "JPEG")
    (tmp_path / "big.jpg").write_bytes(buf.getvalue())
    _write_jsonl(tmp_path / "d.jsonl", [{"problem": "Q?", "answer": "a", "images": ["big.jpg", "big.jpg"]}])
    cfg = dataclasses.replace(tiny[0].data, min_pixels=3136, max_pixels=112 * 112)
    ds = load_dataset_files([str(tmp_path / "d.jsonl")], cfg, tokenizer, processor, "train", 2048)
    sample = ds[0]
    h, w = smart_resize(170, 300, factor=28, min_pixels=3136, max_pixels=112 * 112)
    assert all(im.size == (w, h) for im in sample.images) and w * h <= 112 * 112
    grid_resized = processor(images=sample.images, return_tensors="pt")["image_grid_thw"]
    grid_original = processor(images=[big, big], return_tensors="pt")["image_grid_thw"]
    assert grid_resized.tolist() == grid_original.tolist()  # same tokens as without the up-front resize
    enc = encode_prompts([sample.question], [sample.images], tokenizer, processor)
    assert ds.prompt_lengths[0] == enc.input_ids.shape[1]


def test_renamed_columns(tiny, tmp_path):
    (tmp_path / "x.png").write_bytes(_png())
    _write_jsonl(tmp_path / "r.jsonl", [
        {"uid": "r0", "question": "Renamed?", "solution": "yes", "picture": "x.png"},
        {"uid": "r1", "problem": "old key", "solution": "no", "picture": "x.png"},  # no 'question' here
    ])
    ds = _load(tiny, [str(tmp_path / "r.jsonl")], problem_key="question", answer_key="solution",
               images_key="picture", id_key="uid")
    assert ds.loaded == 1 and ds.skipped == {"missing_problem": 1}
    s = ds[0]
    assert (s.uid, s.question, s.answer, len(s.images)) == ("r0", "Renamed?", "yes", 1)
    # a mapped column absent from a Parquet schema is a configuration error naming key and file
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"problem": ["q"], "answer": ["a"], "images": [_png()]}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"data.problem_key='question'.*t.parquet"):
        _load(tiny, [str(tmp_path / "t.parquet")], problem_key="question")


def test_strict_raises_on_first_bad_record(tiny, files):
    with pytest.raises(ConfigError) as err:
        _load(tiny, files, strict=True)
    message = str(err.value)
    assert "record j2" in message and "corrupt_image" in message and "part1.jsonl" in message
    assert "\n" not in message


def test_bad_files(tiny, tmp_path):
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(ConfigError, match="data.csv"):
        _load(tiny, [str(tmp_path / "data.csv")])
    with pytest.raises(ConfigError, match="missing.jsonl"):
        _load(tiny, [str(tmp_path / "missing.jsonl")])
    (tmp_path / "notds").mkdir()
    with pytest.raises(ConfigError, match="notds"):
        _load(tiny, [str(tmp_path / "notds")])


def test_other_bad_records_and_inputs(tiny, tmp_path):
    """The remaining reasons, image dicts with a path, a JSON-array .json file, and no-id row ids."""
    (tmp_path / "x.png").write_bytes(_png())
    lines = [
        json.dumps({"problem": "ok", "answer": 1.5, "images": {"bytes": None, "path": "x.png"}}),
        json.dumps({"problem": "int images", "answer": "a", "images": 7}),
        json.dumps({"problem": "<image><image>two placeholders", "answer": "a", "images": ["x.png"]}),
        json.dumps({"problem": "   ", "answer": "a", "images": ["x.png"]}),
        json.dumps({"problem": "no images", "answer": "a", "images": []}),
        json.dumps({"problem": {"text": "q"}, "answer": "a", "images": ["x.png"]}),
        "{not json",
        json.dumps({"problem": "answer is dict", "answer": {"v": 1}, "images": ["x.png"]}),
    ]
    (tmp_path / "o.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "arr.json").write_text(json.dumps([{"problem": "from array", "answer": "z", "images": "x.png"}]))
    ds = _load(tiny, [str(tmp_path / "o.jsonl"), str(tmp_path / "arr.json")])
    assert ds.loaded == 2
    assert ds.skipped == {"bad_images_type": 1, "image_placeholder_mismatch": 1, "missing_problem": 1,
                          "no_image": 1, "bad_problem_type": 1, "bad_json": 1, "bad_answer_type": 1}
    assert [(s.question, s.answer, s.uid) for s in (ds[0], ds[1])] == [
        ("ok", "1.5", f"{tmp_path / 'o.jsonl'}:1"), ("from array", "z", f"{tmp_path / 'arr.json'}:1")]
    with pytest.raises(ConfigError, match="no usable records"):
        _load(tiny, [str(tmp_path / "o.jsonl")], problem_key="nothing")


def test_pil_input_and_rgb_conversion(tiny):
    """A PIL image value (what a decoded datasets.Image() gives) is accepted, copied, and converted to RGB."""
    geometry = _Geometry(tiny[2])
    src = Image.new("LA", (56, 56), (0, 0))  # fully transparent black -> white
    out = geometry.decode(src, base_dir=None)
    assert out.mode == "RGB" and out is not src and out.getpixel((3, 3)) == (255, 255, 255)
    rgb = Image.new("RGB", (56, 56), "red")
    assert geometry.decode(rgb, base_dir=None) is not rgb
