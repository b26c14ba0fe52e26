"""Crash-safe training checkpoints: written into a temporary folder, renamed into place, the last K kept.

<output_dir>/checkpoints/step-000006/
    deepspeed/            `engine.save_checkpoint`: model + optimizer (one file per rank under ZeRO); under LoRA the
                          adapters and their optimizer state only (the base: <output_dir>/lora-base or model.path)
    hf/                   config.json, tokenizer, image-processor config (what `papo export` rebuilds from)
    rng/rank-00000.pt     python, numpy and torch (+ CUDA) RNG states of each rank
    trainer_state.json    step, data position, W&B run id, every step's metrics so far
    config.yaml           the resolved configuration
    COMPLETE              written last, before the rename; a folder without it is never resumed from

All ranks write into `step-000006.tmp/` (on one node, or a shared filesystem across nodes), then rank 0
renames it. A SIGKILL at any moment leaves either the old set of checkpoints or the new one, never a
half-written folder under a final name. A full disk removes the half-written folder and stops with one line
naming the path; the earlier checkpoints are untouched. Before a resume loads anything, `verify_checkpoint`
reads the checkpoint's small files and the headers of its tensor files, so a damaged checkpoint is named (with
the previous complete one to resume from instead) before any state or logged metric is touched.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import ConfigError, TrainingStopped

STEP_DIR = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"
DEEPSPEED_TAG = "state"
# keys that may differ between the checkpoint's run and the resuming command (length, bookkeeping, logging, where
# the run folder is, how much held-out evaluation, where the old log-probs come from — the same numbers either
# way, old_policy.py): none of them changes the training itself
RESUMABLE_CHANGES = ("trainer.steps", "trainer.save_every", "trainer.keep_last", "trainer.eval_every",
                     "trainer.max_nonfinite_steps", "trainer.output_dir", "trainer.eval_samples",
                     "trainer.save_final", "trainer.on_policy_reuse", "trainer.lock_wait_s",
                     "trainer.collective_timeout_s", "logging.")
# a write that failed with less than this left on the filesystem failed because the disk is full: torch.save
# reports that only as "unexpected pos ..." or "basic_ios::clear: iostream error", without an errno
FULL_DISK_BYTES = 1 << 20


@dataclass
class TrainerState:
    step: int                  # steps completed; training resumes at this step index
    data_cursor: int
    wandb_run_id: str | None = None
    history: list = field(default_factory=list)
    nonfinite_skipped: int = 0


def check_output_dir(output_dir: Path) -> None:
    """Make sure trainer.output_dir is, or can become, a folder this process can write into."""
    shown = f"trainer.output_dir={str(output_dir)!r}"
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{shown} is a file, not a folder; set trainer.output_dir to a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"{shown}: cannot write there ({err.strerror or err}: {err.filename or output_dir})"
                          ) from None


def check_shared_output_dir(output_dir: Path) -> None:
    """Several processes: every rank must see the same trainer.output_dir (checkpoints are written by all ranks
    into one folder, resumed from one folder). Rank 0 writes a token file there; every rank reads it back; any
    rank that cannot (a node-local disk) makes every rank refuse with one line, before anything is written."""
    import uuid

    import torch.distributed as dist

    from . import distributed as dist_utils
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = Path(output_dir) / f".shared-check-{token[0]}"
    if dist.get_rank() == 0:
        path.write_text(token[0])
    dist_utils.barrier()
    try:
        seen = path.read_text() == token[0]
    except OSError:
        seen = False
    import socket
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, None if seen else socket.gethostname())
    dist_utils.barrier()
    if dist.get_rank() == 0:
        path.unlink(missing_ok=True)
    blind = [(r, h) for r, h in enumerate(hosts) if h is not None]
    if blind:
        shown = ", ".join(f"rank {r} on host {h}" for r, h in blind)
        err = ConfigError(f"trainer.output_dir={str(output_dir)!r} is not shared by all ranks: {shown} cannot see the "
                          f"file rank 0 wrote there (a node-local disk?); several nodes need trainer.output_dir on a "
                          f"shared filesystem (all ranks write each checkpoint into one folder)")
        err.main_only = True
        raise err


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def newest_text(output_dir: Path) -> str:
    """What a stopped run can continue from, for its one line."""
    found = complete_checkpoints(output_dir)
    return f"the newest complete checkpoint is {found[-1]}" if found else "no checkpoint was completed yet"


def unfinished_run_summary(output_dir: Path, steps: int) -> dict:
    """For `--resume`: the summary.json an earlier finish left (a run continued with more steps; {} when there is
    none or it cannot be read). A run that already finished all `steps` is refused: resuming it would only redo
    and overwrite its final model, evaluation and summary."""
    try:
        summary = json.loads((Path(output_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    summary = summary if isinstance(summary, dict) else {}
    if summary.get("steps", 0) >= steps:
        raise ConfigError(f"--resume: trainer.output_dir={str(output_dir)!r} holds a finished run (all "
                          f"{summary['steps']} steps, summary.json): nothing to resume; raise trainer.steps to train "
                          f"on, or start another trainer.output_dir")
    return summary


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """`resume` is "latest" (the newest complete checkpoint in output_dir) or a checkpoint folder."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint under {checkpoints_dir(output_dir)} "
                              f"(start without --resume, or point --resume at a checkpoint folder)")
        return found[-1]
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} file in it)")
    return path


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def previous_complete(checkpoint: Path) -> Path | None:
    """The newest complete checkpoint older than `checkpoint` in the same folder."""
    older = [p for p in complete_checkpoints(checkpoint.parent.parent) if p.name < checkpoint.name]
    return older[-1] if older else None


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise one ConfigError naming the first damaged file of `checkpoint` and the previous complete checkpoint
    to resume from instead. Reads trainer_state.json and config.yaml, and opens every tensor file (torch.save
    writes zip archives: a truncated one has no readable central directory)."""
    def damaged(file: Path, why: str) -> ConfigError:
        previous = previous_complete(checkpoint)
        hint = (f"resume from the previous complete checkpoint with --resume {previous}" if previous else
                "there is no earlier complete checkpoint; start a new trainer.output_dir")
        return ConfigError(f"checkpoint {checkpoint} is damaged: {file}: {why}; {hint}")

    for name, parse in (("trainer_state.json", json.loads), ("config.yaml", yaml.safe_load)):
        try:
            parsed = parse((checkpoint / name).read_text())
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise damaged(checkpoint / name, str(err).splitlines()[0]) from None
        if not isinstance(parsed, dict):
            raise damaged(checkpoint / name, "not a mapping")
    tensor_files = sorted((checkpoint / "deepspeed").rglob("*.pt")) + sorted((checkpoint / "rng").glob("*.pt"))
    if not tensor_files:
        raise damaged(checkpoint / "deepspeed", "no tensor files")
    for file in tensor_files:
        try:
            with zipfile.ZipFile(file) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile) as err:
            raise damaged(file, f"unreadable ({err})") from None


def check_same_run(checkpoint: Path, config: dict) -> None:
    """Refuse to resume into a different run: every setting except length/bookkeeping/logging must match."""
    saved = _flat(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    now = _flat(config)
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
              and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"--resume {checkpoint}: the configuration differs from the checkpoint's run ({shown}"
                          f"{' ...' if len(differ) > 5 else ''}); resume with the same settings or start a new "
                          f"trainer.output_dir")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(output_dir: Path, training_engine, state: TrainerState, config: dict, rank: int,
                    tokenizer, image_processor, keep_last: int) -> Path:
    """Write checkpoint `step-{state.step}` atomically (every rank calls this); returns its final path.
    A full disk raises TrainingStopped naming the path, after removing the half-written folder."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f"{final.name}.tmp"
    try:
        _write_checkpoint(root, final, tmp, training_engine, state, config, rank, tokenizer, image_processor,
                          keep_last)
    except Exception as err:
        full = no_space_left(err, root)
        if full is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = complete_checkpoints(output_dir)
        kept = f"the earlier checkpoints are intact (newest: {earlier[-1]})" if earlier else "no earlier checkpoint"
        raise TrainingStopped(f"{full}; {final.name} was not written, {kept}") from None
    return final


def no_space_left(err: BaseException, path: Path) -> str | None:
    """"no space left on device: <path>" when `err` (from writing under `path`) came from a full disk, else None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device: {err.filename or path}"
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    return f"no space left on device: {path} ({free} bytes free)" if free < FULL_DISK_BYTES else None


def _write_checkpoint(root: Path, final: Path, tmp: Path, training_engine, state: TrainerState, config: dict,
                      rank: int, tokenizer, image_processor, keep_last: int) -> None:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    training_engine.engine.save_checkpoint(str(tmp / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                                           exclude_frozen_parameters=training_engine.adapters_only)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        training_engine.module.config.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        image_processor.save_pretrained(tmp / "hf")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__))
        _fsync_dir_files(tmp)
        (tmp / COMPLETE).write_text(str(state.step))
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _fsync_dir_files(folder: Path) -> None:
    """Flush every file to disk before COMPLETE is written, so a power loss cannot leave COMPLETE on top of
    empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def remove_partial(output_dir: Path) -> None:
    """Delete leftovers of checkpoints whose writing was interrupted."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, training_engine, rank: int) -> TrainerState:
    """Model, optimizer and this rank's RNG states back in place; returns the trainer state to continue from.
    Call `verify_checkpoint` first: damage it cannot see (a corrupt byte inside a tensor file) still stops here
    with one line naming the checkpoint."""
    try:
        load_path, _ = training_engine.engine.load_checkpoint(
            str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
            load_module_strict=not training_engine.adapters_only)  # LoRA: the adapters alone, on the loaded base
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as err:
        previous = previous_complete(path)
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = f"; resume from the previous complete checkpoint with --resume {previous}" if previous else ""
        raise ConfigError(f"--resume {path}: loading the model and optimizer state failed ({why}){hint}") from None
    if load_path is None:
        raise ConfigError(f"--resume {path}: DeepSpeed found no model state under {path / 'deepspeed'}")
    rng_file = path / "rng" / f"rank-{rank:05d}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"--resume {path}: no RNG state for rank {rank} ({rng_file} missing); was the run "
                          f"saved with a different number of processes?")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> TrainerState:
    file = path / "trainer_state.json"
    try:
        return TrainerState(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{file}: unreadable trainer state ({str(err).splitlines()[0]})") from None
