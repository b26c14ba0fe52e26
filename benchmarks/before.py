"""The code before the length-aware round ("before", commit BEFORE_REF) run beside the current code in one benchmark.

The commit's files are unpacked once (`git archive`, into .cache/before-<commit>); a worker process whose
`papo_engine` is that copy answers one JSON command per line on its stdin with one JSON line on its stdout, so the
two codes take turns on one machine, step by step (throughput.py) or rollout by rollout (rollout.py):
    {"trainer": overrides, "lengths": {...}}    build the old PAPOTrainer (the model comes by model.path)
    {"step": k}                                 -> its metrics
    {"rollout": {"model_dir", "overrides", "prompts", "n", "max_new_tokens", "lengths"}}   build the old native
                                                rollout and its prompts (the old code's own encoding)
    {"generate": true}                          -> {"seconds", "tokens", "response_ids"}
Imposed response lengths (rollout/lengths.py) did not exist then: the worker loads the current lengths.py into the
old package and makes the old native rollout end each row at its key's length (eos held back before it, the only
token allowed at it) — the rule the current backends honour, so both codes generate the same tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "1d94ad1"  # main before issue 38: fixed micro-batches, the static-batch decode


def unpacked(ref: str = BEFORE_REF) -> Path:
    """The commit's files under .cache/before-<full commit> (unpacked once)."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    target = ROOT / ".cache" / f"before-{commit}"
    if not (target / "papo_engine" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["git", "archive", commit, "papo_engine"], cwd=ROOT, stdout=archive, check=True)
            archive.seek(0)
            tarfile.open(fileobj=archive).extractall(target, filter="data")
    return target


class Before:
    """The worker process, seen from the benchmark."""

    def __init__(self, ref: str = BEFORE_REF):
        self.root = unpacked(ref)
        # its own process group: the launcher variables of this process (its bound port) are not inherited
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the 'before' worker ({self.root}) ended (exit {self.proc.wait()}): see its stderr")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def _add_imposed_lengths(lengths_file: Path) -> None:
    """Load the current lengths.py as papo_engine.rollout.lengths of the old package (its keyed hash is the old
    sampling.py's, unchanged) and make the old NativeRollout honour `sampling.length_profile`."""
    import papo_engine.rollout.native as native
    from papo_engine.rollout.base import response_keys

    spec = importlib.util.spec_from_file_location("papo_engine.rollout.lengths", lengths_file)
    lengths = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lengths
    spec.loader.exec_module(lengths)
    cls = native.NativeRollout
    generate, chunk, sample = cls.generate, cls._generate_chunk, cls._sample

    def patched_generate(self, prompts, sampling, prompt_keys=None):
        profile = getattr(sampling, "length_profile", None)
        self.pending = (None if profile is None else
                        profile.lengths(response_keys(prompt_keys, sampling.n)).clamp(max=sampling.max_new_tokens))
        return generate(self, prompts, sampling, prompt_keys)

    def patched_chunk(self, prompts, sampling, streams):  # the old decode runs the chunk's rows in order
        rows = len(prompts.images_per_prompt) * sampling.n
        self.chunk_lengths = None if self.pending is None else self.pending[:rows]
        self.pending = None if self.pending is None else self.pending[rows:]
        return chunk(self, prompts, sampling, streams)

    def patched_sample(self, logits, t, sampling, streams, suppress):
        if self.chunk_lengths is not None:
            lengths.force_lengths(logits, self.chunk_lengths, t, self.eos)
        return sample(self, logits, t, sampling, streams, suppress)

    cls.generate, cls._generate_chunk, cls._sample = patched_generate, patched_chunk, patched_sample
    return lengths.LengthProfile


def serve(root: str) -> None:
    replies = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything the old code prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, root)
    import papo_engine
    assert Path(papo_engine.__file__).resolve().is_relative_to(Path(root).resolve()), papo_engine.__file__
    from papo_engine.distributed import prepare_environment
    prepare_environment()
    LengthProfile = _add_imposed_lengths(ROOT / "papo_engine" / "rollout" / "lengths.py")
    state = {}
    for line in sys.stdin:
        command = json.loads(line)
        if "trainer" in command:
            from papo_engine.config import load_config
            from papo_engine.trainer import PAPOTrainer
            trainer = PAPOTrainer(load_config(None, command["trainer"]))
            if command.get("lengths"):
                trainer.sampling.length_profile = LengthProfile(**command["lengths"])
            state["trainer"], reply = trainer, {"ok": True}
        elif "step" in command:
            metrics = state["trainer"].train_step(command["step"])
            reply = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        elif "rollout" in command:
            spec = command["rollout"]
            from papo_engine.config import load_config
            from papo_engine.data import GeneratedDataset
            from papo_engine.head import FusedLMHead
            from papo_engine.models import encode_prompts, load_image_processor, load_policy, load_tokenizer
            from papo_engine.rollout.base import SamplingParams
            from papo_engine.rollout.native import NativeRollout
            cfg = load_config(None, [*spec["overrides"], f"model.path={spec['model_dir']}"])
            tokenizer, processor = load_tokenizer(cfg.model), load_image_processor(cfg)
            model = load_policy(cfg.model, tokenizer, seed=0).eval()
            FusedLMHead.replace_in(model, cfg.kernels.fused_head, cfg.kernels.backend)
            ds = GeneratedDataset(cfg.data.task, "train", spec["prompts"], cfg.data.seed, cfg.data.image_size)
            samples = [ds[i] for i in range(spec["prompts"])]
            sampling = SamplingParams(spec["n"], 1.0, 1.0, spec["max_new_tokens"], seed=0)
            sampling.length_profile = LengthProfile(**spec["lengths"]) if spec.get("lengths") else None
            state.update(rollout=NativeRollout(model, tokenizer, batch_size=spec["prompts"] * spec["n"]),
                         prompts=encode_prompts([s.question for s in samples], [s.images for s in samples],
                                                tokenizer, processor), sampling=sampling)
            reply = {"ok": True}
        else:
            start = time.perf_counter()
            out = state["rollout"].generate(state["prompts"], state["sampling"],
                                            prompt_keys=list(range(len(state["prompts"].images_per_prompt))))
            reply = {"seconds": time.perf_counter() - start, "tokens": int(out.response_mask.sum()),
                     "response_ids": out.response_ids.tolist()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve <unpacked commit>")
