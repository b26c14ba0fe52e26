"""The same entry point under the `deepspeed` launcher: 2 processes (gloo on CPU), ZeRO-3, to completion; its
sharded training checkpoint exports to the same model the run saved."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from papo_engine.distributed import free_port
from two_ranks import wait_for_nodes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # deepspeed-launcher trainings (2 ranks, two simulated nodes)



def test_deepspeed_launcher_two_ranks_zero3(tmp_path, tiny):
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "papo_engine.cli",
           "train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "deepspeed.zero_stage=3",
           "trainer.steps=2", "warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=2",
           "rollout.max_new_tokens=8", "trainer.eval_samples=8", "logging.wandb=false", "trainer.save_every=2",
           f"trainer.output_dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # one writer (rank 0), metrics averaged over ranks
    # the checkpoint is gathered from the ZeRO-3 partitions: full shapes, loadable
    from transformers import Qwen2_5_VLForConditionalGeneration
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-final").state_dict()
    expected = tiny[3].state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    assert any(not torch.equal(saved[k], expected[k]) for k in expected)

    # the ZeRO-3 training checkpoint (one shard per rank) exports to the model the run saved at the same step
    shards = list((tmp_path / "checkpoints" / "step-000002" / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2
    from papo_engine.cli import main
    assert main(["export", str(tmp_path / "checkpoints" / "step-000002"), str(tmp_path / "exported")]) == 0
    from test_eval_export import assert_same_logits
    assert_same_logits(tmp_path / "exported", tmp_path / "checkpoint-final", tiny)


def _two_nodes(hostfile, out, *extra):
    """Two `deepspeed` launcher invocations as the two nodes of a hostfile (`--no_ssh`, node ranks 0 and 1),
    one process each, meeting at 127.0.0.1; returns both results."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    port = str(free_port())
    launcher = Path(sys.executable).parent / "deepspeed"
    nodes = [subprocess.Popen([str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", port, "--module", "papo_engine.cli",
                               "train", "deepspeed.zero_stage=3", "trainer.prompts_per_step=4", "rollout.n=2",
                               "warmup.steps=2", "rollout.max_new_tokens=8", "trainer.eval_samples=2",
                               "logging.wandb=false", "logging.plot=false", "trainer.save_every=2",
                               f"trainer.output_dir={out}", *extra],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for rank in (0, 1)]
    return wait_for_nodes(nodes)


def test_two_nodes_simulated_on_loopback_train_save_and_resume(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    _two_nodes(hostfile, out, "trainer.steps=2")
    checkpoint = out / "checkpoints" / "step-000002"
    assert len(list((checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))) == 2  # one shard per node
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    (node0_out, _), _ = _two_nodes(hostfile, out, "trainer.steps=3", "--resume")
    assert f"resumed from {checkpoint} at step 2" in node0_out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (out / "checkpoint-final" / "model.safetensors").is_file()
