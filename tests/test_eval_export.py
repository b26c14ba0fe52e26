"""`papo export` (1-process and 2-process ZeRO-3 checkpoints) gives the trainer's model, and `papo eval` reports
what a direct greedy computation gives."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from papo_engine.data import GeneratedDataset
from papo_engine.models import encode_prompts, mm_token_type_ids
from papo_engine.prompts import VISION_TOKENS
from papo_engine.rewards import accuracy_format_reward

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trainer.steps=2", "trainer.save_every=2", "warmup.steps=20", "trainer.prompts_per_step=4", "rollout.n=2",
         "trainer.micro_batch_size=4", "trainer.eval_samples=4", "rollout.max_new_tokens=8", "logging.wandb=false",
         "logging.plot=false"]


def _papo(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    _papo("train", f"trainer.output_dir={out}", *SMALL)
    return out


def assert_same_logits(dir_a: Path, dir_b: Path, tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tokenizer, processor, _ = tiny
    samples = [GeneratedDataset("shape_color", "eval", 3, 0, 56)[i] for i in range(3)]
    pb = encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)
    logits = []
    for path in (dir_a, dir_b):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
        with torch.no_grad():
            logits.append(model(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                                pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw,
                                mm_token_type_ids=mm_token_type_ids(pb.input_ids, model.config.image_token_id)).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-6


@pytest.mark.slow
def test_export_equals_the_trainers_model(trained, tmp_path, tiny):
    _papo("export", str(trained / "checkpoints" / "step-000002"), str(tmp_path / "hf"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    assert_same_logits(tmp_path / "hf", trained / "checkpoint-final", tiny)


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", "export", str(tmp_path), str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "not a complete training checkpoint" in result.stderr


def _benchmark_file(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(GeneratedDataset("shape_color", "eval", count, 7, 56)[j] for j in range(count)):
        sample.image.save(folder / f"{i}.png")
        rows.append({"id": f"q{i}", "problem": f"<image>{sample.question}", "answer": sample.answer,
                     "images": [f"{i}.png"]})
    path = folder / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_eval_matches_a_direct_greedy_computation(trained, tmp_path, tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tokenizer, processor, _ = tiny
    bench = _benchmark_file(tmp_path / "bench", 12)
    model_dir = trained / "checkpoint-final"
    report_file = tmp_path / "eval.json"
    result = _papo("eval", "--model", str(model_dir), "--data", str(bench), "--k", "2", "--temperature", "0",
                   "--output", str(report_file), "rollout.max_new_tokens=8")
    report = json.loads(report_file.read_text())
    row = report["benchmarks"]["colors"]
    assert row["questions"] == 12 and sum(row["skipped"].values()) == 0
    assert "colors" in result.stdout and "avg@2" in result.stdout
    # direct: one question at a time, no padding, greedy, graded by the reward's accuracy
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    correct = []
    for i, line in enumerate(bench.read_text().splitlines()):
        record = json.loads(line)
        image = Image.open(bench.parent / record["images"][0]).convert("RGB")
        pb = encode_prompts([record["problem"].replace("<image>", "")], [[image]], tokenizer, processor)
        with torch.no_grad():
            out = model.generate(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                                 pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw,
                                 mm_token_type_ids=mm_token_type_ids(pb.input_ids, model.config.image_token_id),
                                 do_sample=False, max_new_tokens=8, suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, pb.input_ids.shape[1]:], skip_special_tokens=True)
        correct.append(accuracy_format_reward(text, record["answer"])["accuracy"])
    assert row["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-9)


def _one_line_error(*args):
    result = subprocess.run([sys.executable, "-m", "papo_engine.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("papo:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_eval_of_a_folder_without_weights_is_one_line(trained, tmp_path):
    bench = _benchmark_file(tmp_path / "bench", 1)
    config_only = trained / "checkpoints" / "step-000002" / "hf"  # config + tokenizer, no weights
    line = _one_line_error("eval", "--model", str(config_only), "--data", str(bench))
    assert f"--model {config_only}: no model weights in it" in line
    checkpoint = trained / "checkpoints" / "step-000002"
    line = _one_line_error("eval", "--model", str(checkpoint), "--data", str(bench))
    assert "is a training checkpoint" in line and f"papo export {checkpoint}" in line


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint_or_onto_a_file_is_one_line(trained, tmp_path):
    import shutil
    damaged = shutil.copytree(trained / "checkpoints" / "step-000002", tmp_path / "step-000002")
    target = tmp_path / "a_file"
    target.write_text("x")
    assert f"{target} is a file" in _one_line_error("export", str(damaged), str(target))
    model_states = next((damaged / "deepspeed").rglob("*model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:4096])
    line = _one_line_error("export", str(damaged), str(tmp_path / "out"))
    assert f"{model_states}: unreadable" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# issue 43, items 4, 7, 8, 9, 10: nothing a user typed loses a result or replaces a file without one line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Hugging Face directory of the tiny model at its seed-0 initialization (no training needed)."""
    from papo_engine.config import Config
    from papo_engine.models import load_image_processor, load_policy, load_tokenizer
    folder = tmp_path_factory.mktemp("model")
    cfg = Config()
    tokenizer = load_tokenizer(cfg.model)
    load_policy(cfg.model, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    load_image_processor(cfg).save_pretrained(folder)
    return folder


def _main(capsys, *args):
    """`papo` in this process: (exit code, its `papo:` lines on stderr); a Ctrl-C that escapes is a result too."""
    from papo_engine.cli import main
    try:
        code = main(list(args))
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("papo:")]


EVAL = ["--k", "1", "--temperature", "0", "rollout.max_new_tokens=4"]


def test_eval_names_files_that_share_a_stem_by_their_paths(model_dir, tmp_path, capsys):
    a, b = _benchmark_file(tmp_path / "a", 2), _benchmark_file(tmp_path / "b", 3)
    report_file = tmp_path / "eval.json"
    code, lines = _main(capsys, "eval", "--model", str(model_dir), "--data", str(a), str(b), "--output",
                        str(report_file), *EVAL)
    assert code == 0, lines
    report = json.loads(report_file.read_text())
    assert {name: row["questions"] for name, row in report["benchmarks"].items()} == {str(a): 2, str(b): 3}
    assert "pending" not in report
    code, lines = _main(capsys, "eval", "--model", str(model_dir), "--data", str(a), str(a), *EVAL)
    assert code == 2 and lines == [f"papo: error: papo eval: --data {a} is given twice; give each benchmark file "
                                   f"once"]


def test_eval_output_that_is_a_folder_is_refused_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    import papo_engine.evaluation as evaluation
    monkeypatch.setattr(evaluation, "load_policy", lambda *a, **k: pytest.fail("the evaluation was started"))
    bench = _benchmark_file(tmp_path / "bench", 1)
    code, lines = _main(capsys, "eval", "--model", str(model_dir), "--data", str(bench), "--output", str(tmp_path),
                        *EVAL)
    assert code == 2 and lines == [f"papo: error: papo eval: --output {tmp_path} is a folder; give the report's "
                                   f"file path, e.g. {tmp_path / 'eval.json'}"]


def test_ctrl_c_during_eval_keeps_the_files_done(model_dir, tmp_path, capsys, monkeypatch):
    import papo_engine.evaluation as evaluation
    files = [_benchmark_file(tmp_path / name, 2) for name in ("one", "two", "three")]
    real_load = evaluation.load_dataset_files

    def load_then_ctrl_c(paths, *args, **kwargs):
        if paths == [str(files[1])]:
            raise KeyboardInterrupt  # as Python raises it on SIGINT
        return real_load(paths, *args, **kwargs)

    monkeypatch.setattr(evaluation, "load_dataset_files", load_then_ctrl_c)
    report_file = tmp_path / "eval.json"
    code, lines = _main(capsys, "eval", "--model", str(model_dir), "--data", *map(str, files), "--output",
                        str(report_file), *EVAL)
    assert code == 130 and lines == [
        f"papo: stopped: SIGINT received during the evaluation of {files[1]}: the results of 1 of 3 files "
        f"({files[0]}) are in {report_file}; evaluate the rest with --data {files[1]} {files[2]} and another --output"]
    report = json.loads(report_file.read_text())
    assert list(report["benchmarks"]) == [str(files[0])] and report["benchmarks"][str(files[0])]["questions"] == 2
    assert report["pending"] == [str(files[1]), str(files[2])]


def _fake_checkpoint(folder: Path) -> Path:
    """Enough of a checkpoint for the checks made before anything is read: a folder with COMPLETE."""
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text("2")
    return folder


def test_export_never_writes_into_a_folder_that_holds_files(tmp_path, capsys):
    checkpoint = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002")
    final = tmp_path / "run" / "checkpoint-final"  # a run's own final model
    final.mkdir()
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        (final / name).write_text("kept")
    code, lines = _main(capsys, "export", str(checkpoint), str(final))
    assert code == 2 and lines == [f"papo: error: papo export: {final} is not empty (3 entries: config.json, "
                                   f"model.safetensors.index.json, tokenizer.json); give a new or empty folder "
                                   f"(nothing is replaced)"]
    assert sorted(p.read_text() for p in final.iterdir()) == ["kept"] * 3
    for inside in (checkpoint, checkpoint / "exported"):
        code, lines = _main(capsys, "export", str(checkpoint), str(inside))
        assert code == 2 and lines == [f"papo: error: papo export: {inside} is within the checkpoint {checkpoint}; "
                                       f"give a folder outside it"]
    assert not (checkpoint / "exported").exists()


def test_export_of_a_checkpoint_that_is_gone_says_so(tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (150, 200):
        _fake_checkpoint(checkpoints / f"step-{step:06d}")
    removed = checkpoints / "step-000050"  # deleted by keep_last
    code, lines = _main(capsys, "export", str(removed), str(tmp_path / "out"))
    assert code == 2 and lines == [f"papo: error: papo export: {removed} does not exist; the run keeps only its "
                                   f"newest trainer.keep_last checkpoints: step-000150, step-000200 in {checkpoints}"]
    never = tmp_path / "no" / "such" / "folder"
    code, lines = _main(capsys, "export", str(never), str(tmp_path / "out"))
    assert code == 2 and lines == [f"papo: error: papo export: {never} does not exist"]
    assert not (tmp_path / "out").exists()
