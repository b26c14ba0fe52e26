"""Qwen3-VL and Qwen3.5 trainings end to end, each on a tiny model built from its config: `papo train` on one rank,
two ZeRO-3 ranks following it through a checkpoint and `--resume`, `papo export` of the checkpoint loading with the
family's `from_pretrained` and giving the trainer's model, and `papo eval` on the export. Qwen3-VL trains with the
native rollout, Qwen3.5 with HF generate (its native rollout is refused)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from papo_engine.config import load_config
from papo_engine.data import GeneratedDataset
from papo_engine.distributed import free_port
from papo_engine.evaluation import evaluate_files
from papo_engine.export import export_checkpoint
from papo_engine.families import FAMILIES
from papo_engine.models import encode_prompts, load_image_processor, load_tokenizer, mm_token_type_ids
from papo_engine.prompts import vision_token_ids
from papo_engine.rewards import accuracy_format_reward

from test_families import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trainings in subprocesses
FAMILY_RUNS = {"qwen3_vl": ["model.architecture=tiny-qwen3-vl", "rollout.backend=native"],
               "qwen3_5": ["model.architecture=tiny-qwen3.5", "rollout.backend=hf"]}
# a constant lr: the run stopped after step 1 and resumed for step 2 has the lr of the 2-step run
RUN = [*(o for o in TINY if not o.startswith("rollout.backend")), "warmup.steps=4", "trainer.prompts_per_step=4",
       "rollout.n=2", "rollout.max_new_tokens=6", "trainer.micro_batch_size=4", "trainer.eval_samples=2",
       "trainer.save_every=1", "optim.lr_schedule=constant", "logging.wandb=false", "logging.plot=false",
       "kernels.backend=torch"]
COMPARED = ["reward", "response_length", "perception_kl", "entropy", "update/loss", "update/pg_loss", "grad_norm"]


def _train(out: Path, ranks: int, *overrides, resume: bool = False) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(ranks), "--master_port", str(free_port())]
    cmd = [*launch, "-m", "papo_engine.cli", "train", f"trainer.output_dir={out}", *RUN, *overrides,
           *(["--resume"] if resume else [])]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=list(FAMILY_RUNS))
def runs(request, tmp_path_factory):
    """Per family: a 2-step run on one rank, and the same on two ZeRO-3 ranks stopped after step 1 (its checkpoint)
    and resumed for step 2."""
    family = request.param
    one = tmp_path_factory.mktemp(f"{family}_one")
    _train(one, 1, *FAMILY_RUNS[family], "trainer.steps=2")
    two = tmp_path_factory.mktemp(f"{family}_two")
    _train(two, 2, *FAMILY_RUNS[family], "trainer.steps=1", "deepspeed.zero_stage=3")
    _train(two, 2, *FAMILY_RUNS[family], "trainer.steps=2", "deepspeed.zero_stage=3", resume=True)
    return family, one, two


def test_two_zero3_ranks_through_a_resume_follow_one_rank(runs):
    family, one, two = runs
    rows_1, rows_2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2] == [0, 1]
    for a, b in zip(rows_1, rows_2):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (family, a["step"], key)
    assert all(r["grad_norm"] > 0 for r in rows_1)  # real updates
    weights_1 = load_file(one / "checkpoint-final" / "model.safetensors")
    weights_2 = load_file(two / "checkpoint-final" / "model.safetensors")
    assert weights_1.keys() == weights_2.keys()
    assert max(float((weights_1[k] - weights_2[k]).abs().max()) for k in weights_1) < 1e-5


def test_export_loads_with_the_familys_class_and_is_the_trained_model(runs, tmp_path):
    family, one, _ = runs
    export_checkpoint(one / "checkpoints" / "step-000002", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    cfg = load_config(None, [f"model.path={tmp_path / 'hf'}", "rollout.backend=hf"])
    processor = load_image_processor(cfg)
    assert processor.patch_size == 16 and list(processor.image_mean) == [0.5, 0.5, 0.5]  # the saved processor
    prompts = _prompts(cfg, [GeneratedDataset("shape_color", "eval", 2, 0, 64)[i] for i in range(2)])
    logits = []
    for path in (tmp_path / "hf", one / "checkpoint-final"):
        model = FAMILIES[family].model_class.from_pretrained(path).eval()
        with torch.no_grad():
            logits.append(model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                                mm_token_type_ids=mm_token_type_ids(prompts.input_ids,
                                                                    model.config.image_token_id)).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-6


def _prompts(cfg, samples):
    return encode_prompts([s.question for s in samples], [s.images for s in samples], load_tokenizer(cfg.model),
                          load_image_processor(cfg))


def test_eval_matches_a_direct_greedy_computation(runs, tmp_path):
    """`papo eval` of checkpoint-final with the family's rollout backend (greedy avg@1) = HF generate on each
    question alone, graded by the reward's accuracy."""
    family, one, _ = runs
    data = tmp_path / "bench.jsonl"
    samples = [GeneratedDataset("shape_color", "eval", 4, 1, 64)[i] for i in range(4)]
    for i, s in enumerate(samples):
        s.images[0].save(tmp_path / f"{i}.png")
    data.write_text("\n".join(json.dumps({"problem": s.question, "answer": s.answer, "images": [f"{i}.png"]})
                              for i, s in enumerate(samples)) + "\n")
    cfg = load_config(None, [f"model.path={one / 'checkpoint-final'}", FAMILY_RUNS[family][1],
                             "rollout.max_new_tokens=6"])
    row = evaluate_files(cfg, [str(data)], k=1, temperature=0.0)["benchmarks"]["bench"]
    assert row["questions"] == 4 and sum(row["skipped"].values()) == 0
    model = FAMILIES[family].model_class.from_pretrained(one / "checkpoint-final").eval()
    tokenizer = load_tokenizer(cfg.model)
    correct = []
    for s in samples:
        prompts = _prompts(cfg, [s])
        with torch.no_grad():
            out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                 pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                                 mm_token_type_ids=mm_token_type_ids(prompts.input_ids, model.config.image_token_id),
                                 do_sample=False, max_new_tokens=6, suppress_tokens=vision_token_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, prompts.input_ids.shape[1]:], skip_special_tokens=True)
        correct.append(accuracy_format_reward(text, s.answer)["accuracy"])
    assert row["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-9)
