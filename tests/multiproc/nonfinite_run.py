"""Train a few tiny steps with a NaN injected into the loss at chosen steps; record, per update, whether the
parameters changed (and under ZeRO-3 whether the engine's non-finite guard fired). Usage: nonfinite_run.py OUT_JSON OUTPUT_DIR NAN_STEPS(comma list) [overrides...]"""
import json
import sys

import torch

from papo_engine import trainer as trainer_module
from papo_engine import update as update_module
from papo_engine.config import TrainingStopped, load_config

out_json, output_dir, nan_steps, *overrides = sys.argv[1:]
nan_steps = {int(s) for s in nan_steps.split(",") if s}
cfg = load_config(None, [f"trainer.output_dir={output_dir}", *overrides])
current = {"step": -1}
real_loss = update_module.papo_loss


def loss_with_nan(*args, **kwargs):
    loss, metrics = real_loss(*args, **kwargs)
    return (loss * float("nan") if current["step"] in nan_steps else loss), metrics


update_module.papo_loss = loss_with_nan  # the update role forms the loss
trainer = trainer_module.PAPOTrainer(cfg)


def snapshot():
    params = list(trainer.engine.module.parameters())
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


changed = {}
real_update = trainer.update


def recording_update(*args, **kwargs):
    current["step"] += 1
    before = snapshot()
    result = real_update(*args, **kwargs)
    changed[current["step"]] = any(not torch.equal(a, b) for a, b in zip(before, snapshot()))
    return result


trainer.update = recording_update
# under ZeRO-3 the engine's own guard must see the non-finite gradients (DeepSpeed checks only under fp16)
zero3_guard = {}
if cfg.deepspeed.zero_stage == 3:
    real_guard = trainer.engine._zero3_grads_nonfinite

    def recording_guard():
        zero3_guard[current["step"]] = real_guard()
        return zero3_guard[current["step"]]

    trainer.engine._zero3_grads_nonfinite = recording_guard
verdict = {"changed": changed, "zero3_guard": zero3_guard}
try:
    trainer.train()
    verdict["stopped"] = None
except TrainingStopped as err:
    verdict["stopped"] = str(err)
verdict["finite_params"] = all(bool(torch.isfinite(p).all()) for p in snapshot())
json.dump(verdict, open(out_json, "w"))
