"""Metrics out: one JSON line per step (flushed, so nothing is lost on a crash), W&B, and the final PNG plot.

W&B runs offline when no API key is configured and online when one is; if W&B cannot start (no network,
bad key) training goes on with one warning — logging never stops a run.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Tracker:
    """`resume_step`: continue a run — metrics.jsonl keeps only the steps before it (steps logged after the
    checkpoint are re-done) and W&B continues `resume_run_id`."""

    def __init__(self, output_dir: Path, config: dict, use_wandb: bool, project: str, run_name: str | None,
                 enabled: bool = True, resume_run_id: str | None = None, resume_step: int | None = None):
        self.enabled = enabled
        self.metrics_path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate(resume_step)
        self._file = self.metrics_path.open("a")
        if use_wandb:
            self.wandb_run = self._start_wandb(output_dir, config, project, run_name, resume_run_id)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _truncate(self, first_step_to_redo: int) -> None:
        """Keep the lines of steps before `first_step_to_redo`. A line that is not a whole JSON record (the
        half-written last line of a run that died mid-write, e.g. on a full disk) is dropped with one warning."""
        if not self.metrics_path.is_file():
            return
        keep, broken = [], []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                broken.append(number)
                continue
            if step < first_step_to_redo:
                keep.append(line)
        if broken:
            warnings.warn(f"{self.metrics_path}: dropped {len(broken)} incomplete line(s) (line "
                          f"{', '.join(map(str, broken[:5]))}{' ...' if len(broken) > 5 else ''}), "
                          f"e.g. the last line of a run that stopped while writing it")
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    @staticmethod
    def _start_wandb(output_dir: Path, config: dict, project: str, run_name: str | None,
                     resume_run_id: str | None = None):
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed: metrics go to metrics.jsonl only")
            return None
        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
        kwargs = dict(project=project, name=run_name, config=config, dir=str(output_dir),
                      settings=wandb.Settings(silent=True, console="off"))
        if resume_run_id:
            kwargs.update(id=resume_run_id, resume="allow")
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as err:  # network, key, quota: fall back, never stop training
            if mode == "offline":
                warnings.warn(f"W&B could not start ({err}); metrics go to metrics.jsonl only")
                return None
            warnings.warn(f"W&B online failed ({err}); logging offline instead")
            try:
                return wandb.init(mode="offline", **kwargs)
            except Exception as err2:
                warnings.warn(f"W&B offline failed too ({err2}); metrics go to metrics.jsonl only")
                return None

    def log(self, step: int, metrics: dict, histograms: dict | None = None, samples: list | None = None) -> None:
        """One JSON line: the step's metrics, the raw values behind each histogram (e.g. the per-sequence
        perception reliance), and a few sampled responses under "samples" to read by eye."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        for name, values in (histograms or {}).items():
            record[name] = [round(float(v), 6) for v in values]
        if samples:
            record["samples"] = samples
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            payload = dict(metrics)
            if histograms:
                import wandb
                payload.update({k: wandb.Histogram(v) for k, v in histograms.items() if len(v)})
            try:
                self.wandb_run.log(payload, step=step)
            except Exception as err:
                warnings.warn(f"W&B log failed ({err}); disabling W&B for this run")
                self.wandb_run = None

    def summary(self, values: dict) -> None:
        if self.enabled and self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.wandb_run, "dir", None) if self.wandb_run is not None else None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


PLOT_KEYS = [("reward", "reward"), ("accuracy", "accuracy"), ("perception_kl", "perception KL"),
             ("entropy", "entropy (orig)"), ("masked_entropy", "entropy (masked)"), ("response_length", "response length")]


def plot_metrics(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """A 2×3 grid of the main curves from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward" in r]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, label) in zip(axes.flat, PLOT_KEYS):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".", linewidth=1)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
