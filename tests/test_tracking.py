"""Logging never stops training: W&B that cannot start online falls back to offline (one warning), one that
cannot start at all leaves metrics.jsonl, and a failing log call disables W&B with one warning."""
import json
import warnings

import pytest

from papo_engine.tracking import Tracker


class _Run:
    id = "run-1"

    def __init__(self, fail_log=False):
        self.fail_log, self.logged = fail_log, []

    def log(self, payload, step):
        if self.fail_log:
            raise ConnectionError("network down")
        self.logged.append((step, payload))

    def finish(self):
        pass


def _fake_wandb(monkeypatch, init):
    import wandb
    monkeypatch.setattr(wandb, "init", init)


def test_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    modes = []

    def init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise PermissionError("bad API key")
        return _Run()

    _fake_wandb(monkeypatch, init)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(UserWarning, match="W&B online failed .*bad API key.*offline") as caught:
        tracker = Tracker(tmp_path, {}, True, "p", None)
    assert modes == ["online", "offline"] and len(caught) == 1 and tracker.run_id == "run-1"


def test_no_wandb_at_all_still_writes_metrics(tmp_path, monkeypatch):
    def init(mode, **kwargs):
        raise OSError("cannot write")

    _fake_wandb(monkeypatch, init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.warns(UserWarning, match="metrics go to metrics.jsonl only"):
        tracker = Tracker(tmp_path, {}, True, "p", None)
    tracker.log(0, {"reward": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward"] == 0.5


def test_failing_log_call_disables_wandb_once(tmp_path, monkeypatch):
    _fake_wandb(monkeypatch, lambda mode, **kwargs: _Run(fail_log=True))
    tracker = Tracker(tmp_path, {}, True, "p", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            tracker.log(step, {"reward": float(step)})
    assert len([w for w in caught if "disabling W&B" in str(w.message)]) == 1
    assert tracker.wandb_run is None
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # nothing lost


def test_resume_truncates_steps_after_the_checkpoint_and_keeps_the_run_id(tmp_path, monkeypatch):
    seen = {}

    def init(mode, **kwargs):
        seen.update(kwargs)
        return _Run()

    _fake_wandb(monkeypatch, init)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)))
    Tracker(tmp_path, {}, True, "p", None, resume_run_id="abc", resume_step=3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert seen["id"] == "abc" and seen["resume"] == "allow"


def test_resume_drops_a_half_written_last_line_with_one_warning(tmp_path):
    """A run that died while writing a line (e.g. on a full disk) left half a JSON record at the end."""
    lines = [json.dumps({"step": s, "reward": 0.5}) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "rew')
    with pytest.warns(UserWarning, match=r"dropped 1 incomplete line\(s\) \(line 5\)") as caught:
        tracker = Tracker(tmp_path, {}, False, "p", None, resume_step=3)
    assert len(caught) == 1
    tracker.log(3, {"reward": 0.25})
    tracker.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
