"""Two hosts with their own network interfaces: two network namespaces joined by a veth pair (iproute2, root),
one `deepspeed --no_ssh --node_rank i` launcher per namespace, gloo over the veth addresses (not loopback: each
namespace's only other interface is its own `lo`). Train with a checkpoint, then resume, as the loopback two-node
test does. Nothing here addresses anything but the two namespaces' own addresses (10.231.<k>.1 and .2, in
namespaces this test creates and deletes). Skipped, saying why, where namespaces cannot be created (not root, no
`ip`, no CAP_NET_ADMIN)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from tests.test_resume import ROOT
from two_ranks import wait_for_nodes

RUN = ["deepspeed.zero_stage=2", "trainer.prompts_per_step=4", "rollout.n=2", "warmup.steps=0",
       "rollout.max_new_tokens=4", "trainer.eval_samples=2", "data.train_size=16", "data.eval_size=4",
       "logging.wandb=false", "logging.plot=false", "trainer.save_every=2", "trainer.micro_batch_size=4"]
PORT = "29533"  # inside the namespaces only: nothing else listens there


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def two_hosts():
    """Namespaces a and b, veth ends va (10.231.k.1) and vb (10.231.k.2); yields [(namespace, address, ifname)]."""
    if shutil.which("ip") is None:
        pytest.skip("two-namespace test: `ip` (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("two-namespace test: needs root (CAP_NET_ADMIN) to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    names = [f"papo-{tag}-a", f"papo-{tag}-b"]
    subnet = f"10.231.{int(tag[:2], 16)}"
    created = []
    try:
        for ns in names:
            made = _ip("netns", "add", ns, check=False)
            if made.returncode:
                pytest.skip(f"two-namespace test: cannot create a network namespace ({made.stderr.strip()})")
            created.append(ns)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        hosts = []
        for ns, end, host in ((names[0], f"va{tag}", 1), (names[1], f"vb{tag}", 2)):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", end)
            _ip("-n", ns, "link", "set", end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append((ns, f"{subnet}.{host}", end))
        ping = subprocess.run(["ip", "netns", "exec", names[1], sys.executable, "-c",
                               f"import socket; socket.create_connection(('{subnet}.1', 9), 2)"],
                              capture_output=True, text=True)
        assert "unreachable" not in ping.stderr.lower(), ping.stderr  # refused (nothing listens) = reachable
        yield hosts
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)  # takes its veth end, and so the pair, with it


def _launch(hosts, hostfile, out, *extra, node1_prefix=(), program=("--module", "papo_engine.cli", "train"),
            env_extra=None):
    """One `deepspeed` launcher per namespace, started (not waited for)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    master = hosts[0][1]
    return [subprocess.Popen(["ip", "netns", "exec", ns, *(node1_prefix if rank else ()), launcher, "--hostfile",
                              str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", master,
                              "--master_port", PORT, *program, f"trainer.output_dir={out}", *RUN, *extra],
                             cwd=ROOT, env=dict(env, GLOO_SOCKET_IFNAME=ifname), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank, (ns, _, ifname) in enumerate(hosts)]


def _two_nodes(hosts, hostfile, out, *extra, node1_prefix=(), check=True):
    nodes = _launch(hosts, hostfile, out, *extra, node1_prefix=node1_prefix)
    results = wait_for_nodes(nodes, check=check)
    return [(node.returncode, *result) for node, result in zip(nodes, results)] if not check else results


@pytest.mark.slow
def test_two_hosts_over_a_veth_pair_train_save_and_resume(two_hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    _two_nodes(two_hosts, hostfile, out, "trainer.steps=2")
    checkpoint = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    (node0_out, _), _ = _two_nodes(two_hosts, hostfile, out, "trainer.steps=3", "--resume")
    assert f"resumed from {checkpoint} at step 2" in node0_out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_node_local_output_dirs_are_refused_at_start(two_hosts, tmp_path):
    """Node 1 sees its own empty disk at trainer.output_dir (a tmpfs mounted over the path in its own mount
    namespace): both nodes stop at the start with one line naming the rank that cannot see rank 0's files, exit
    2 — not at the first checkpoint or resume (before: the run went on, each node writing its own folder)."""
    if shutil.which("unshare") is None:
        pytest.skip("node-local disk test: `unshare` (util-linux) is not installed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    out.mkdir()
    local_disk = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  f"mount -t tmpfs papo-node-local {out} && exec \"$@\"", "sh"]
    (code0, _, stderr0), (code1, _, stderr1) = _two_nodes(two_hosts, hostfile, out, "trainer.steps=2",
                                                          node1_prefix=local_disk, check=False)
    assert (code0, code1) == (2, 2), stderr0[-3000:] + stderr1[-3000:]  # the launchers pass the workers' code on
    lines = [line for line in stderr0.splitlines() if line.startswith("papo:")]
    assert len(lines) == 1 and "is not shared by all ranks: rank 1 on host " in lines[0], stderr0[-3000:]
    assert "shared filesystem" in lines[0] and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_node_lost_mid_run_ends_the_other_in_bounded_time(two_hosts, tmp_path):
    """After checkpoint step-2, node 1 vanishes as in a power loss: its veth goes down first (no FIN or RST ever
    reaches node 0), then its processes are SIGKILLed. Node 0, waiting in the next collective, ends within
    trainer.collective_timeout_s (10 s here) plus the launcher's shutdown with one line naming the timeout and
    the checkpoint, exit 1, no hang; --resume on both nodes (veth back up) continues from step-2 to exactly the
    uninterrupted run's metrics and weights."""
    import time

    import torch
    from safetensors.torch import load_file

    from tests.test_resume import _metrics
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run = ["trainer.steps=3", "trainer.collective_timeout_s=10"]
    straight, lost, hold = tmp_path / "straight", tmp_path / "lost", tmp_path / "hold"
    _two_nodes(two_hosts, hostfile, straight, *run)
    hold.touch()
    nodes = _launch(two_hosts, hostfile, lost, *run, env_extra={"PARK_FROM_STEP": "2"},
                    program=(str(ROOT / "tests" / "multiproc" / "park_after_steps.py"), str(hold), "train"))
    try:
        deadline = time.time() + 300
        while not (lost / "checkpoints" / "step-000002" / "COMPLETE").is_file():
            assert all(n.poll() is None for n in nodes) and time.time() < deadline, nodes[0].communicate()[1][-3000:]
            time.sleep(0.05)
        ns_b, _, end_b = two_hosts[1]
        _ip("-n", ns_b, "link", "set", end_b, "down")
        os.killpg(nodes[1].pid, signal.SIGKILL)
        nodes[1].wait()
        cut = time.time()
        hold.unlink()  # node 0 goes on into the next collective, where node 1 never answers
        _, stderr0 = nodes[0].communicate(timeout=120)
        took = time.time() - cut
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert nodes[0].returncode == 1, stderr0[-3000:]
    assert took < 60, took  # 10 s timeout + the launcher's shutdown; no hang
    lines = [line for line in stderr0.splitlines() if line.startswith("papo:")]
    assert len(lines) == 1 and "lost contact with another rank" in lines[0], stderr0[-3000:]
    assert "trainer.collective_timeout_s=10 s" in lines[0]
    assert f"the newest complete checkpoint is {lost / 'checkpoints' / 'step-000002'}" in lines[0]
    _ip("-n", ns_b, "link", "set", end_b, "up")
    _two_nodes(two_hosts, hostfile, lost, *run, "--resume")
    assert _metrics(lost) == _metrics(straight)
    a = load_file(straight / "checkpoint-final" / "model.safetensors")
    b = load_file(lost / "checkpoint-final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
