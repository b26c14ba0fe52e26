import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from papo_engine.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_default_matches_embedded_default():
    """tiny_cpu.yaml spells out the embedded default: every key, with the default's value."""
    assert load_config(ROOT / "configs" / "tiny_cpu.yaml").to_dict() == Config().to_dict()
    spelled = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    assert {s: sorted(v) for s, v in spelled.items()} == {s: sorted(v) for s, v in Config().to_dict().items()}


def test_off_is_a_choice_not_a_boolean():
    assert load_config(None, ["algo.rollout_is=off"]).algo.rollout_is == "off"
    with pytest.raises(ConfigError, match="algo.rollout_is=True: must be one of off, truncate, mask"):
        load_config(None, ["algo.rollout_is=true"])


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["trainer.steps=20", "algo.gamma=0.05", "algo.dual_clip=null",
                             "kernels.fused_head=false", "optim.betas=[0.8, 0.9]"])
    assert cfg.trainer.steps == 20 and isinstance(cfg.trainer.steps, int)
    assert cfg.algo.gamma == 0.05 and cfg.algo.dual_clip is None
    assert cfg.kernels.fused_head is False and cfg.optim.betas == [0.8, 0.9]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algo": {"gamma": 0.01}, "trainer": {"steps": 7}}))
    cfg = load_config(path, ["trainer.steps=9"])
    assert (cfg.algo.gamma, cfg.trainer.steps) == (0.01, 9)


@pytest.mark.parametrize("overrides, needle", [
    (["trainer.stepz=3"], "unknown key 'trainer.stepz'"),
    (["nosection.x=1"], "unknown key 'nosection.x'"),
    (["trainer.steps=abc"], "trainer.steps='abc'"),
    (["trainer.steps=2.5"], "trainer.steps=2.5"),
    (["trainer.steps=0"], "trainer.steps=0: must be a int >= 1"),
    (["algo.gamma=-0.1"], "algo.gamma=-0.1"),
    (["mask.ratio=0"], "mask.ratio=0"),
    (["mask.ratio=1.5"], "mask.ratio=1.5"),
    (["mask.unit=pixel"], "one of merge, patch"),
    (["rollout.n=1"], "rollout.n=1: must be >= 2"),
    (["kernels.fused_head=maybe"], "kernels.fused_head='maybe'"),
    (["model.path=/does/not/exist"], "model.path='/does/not/exist': directory not found"),
    (["trainer"], "expected key.sub=value"),
    (["trainer=3"], "is a section"),
])
def test_bad_values_name_key_value_and_allowed(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'trainer.stepz'"):
        load_config(unknown)


def _papo(*args):
    return subprocess.run([sys.executable, "-m", "papo_engine.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "trainer.stepz=1"], "unknown key 'trainer.stepz'"),
    (["train", "model.path=/no/such/model"], "model.path='/no/such/model': directory not found"),
    (["train", "algo.gamma=-1"], "algo.gamma=-1"),
    (["train", "mask.ratio=0"], "mask.ratio=0"),
    (["train", "mask.ratio=1.2"], "mask.ratio=1.2"),
    (["train", "rollout.n=1"], "rollout.n=1: must be >= 2"),
    (["train", "data.train_files=[/no/such/data.jsonl]", "warmup.steps=0"], "'/no/such/data.jsonl' not found"),
    (["train", "data.train_files=[tests/test_config.py]"], "warmup.steps=200"),
    (["train", "data.min_pixels=10000", "data.max_pixels=5000"], "data.min_pixels=10000 > data.max_pixels=5000"),
    (["train", "deepspeed.offload_params=true"], "needs deepspeed.zero_stage=3"),
    (["train", "deepspeed.offload_optimizer=true"], "needs deepspeed.zero_stage >= 1"),
    (["train", "optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["train", "rollout.backend=vllm"], "rollout.backend='vllm' needs model.path"),
    (["train", "algo.perception_kl=full", "algo.masked_grad=false"], "algo.perception_kl='full'"),
    (["train", "trainer.micro_batch_size=0"], "trainer.micro_batch_size=0"),
    (["train", "trainer.mini_batch_prompts=5"], "must divide trainer.prompts_per_step=16"),
    # starts DeepSpeed's process group before the checkpoint is looked at (~10 s)
    pytest.param(["train", "--resume=tests", "trainer.output_dir=/tmp/papo-no-such-run"],
                 "--resume tests: not a complete checkpoint", marks=pytest.mark.slow),
])
def test_cli_errors_are_one_line_exit_2(args, needle):
    result = _papo(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("papo: error:") and needle in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # the second case loads the trainer in a subprocess
def test_cli_malformed_yaml_and_unloadable_model_dir(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {steps: 3\n")
    empty_model_dir = tmp_path / "model"
    empty_model_dir.mkdir()
    for args, needle in ((["train", "--config", str(bad)], "malformed YAML"),
                         (["train", f"model.path={empty_model_dir}", "logging.wandb=false",
                           f"trainer.output_dir={tmp_path / 'run'}"], "no tokenizer.json there")):
        result = _papo(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr[-2000:]


def test_cli_help_lists_options():
    result = _papo("train", "--help")
    assert result.returncode == 0
    for key in ("trainer.steps", "algo.gamma", "mask.ratio", "kernels.fused_head", "--config"):
        assert key in result.stdout


def test_attention_auto_resolves_to_sdpa_without_flash_attn(monkeypatch):
    from papo_engine.models import attention_implementation
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert attention_implementation("auto") == "sdpa"
    assert attention_implementation("eager") == "eager"
    with pytest.raises(ConfigError, match="flash_attention_2' needs CUDA and the flash-attn package"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])


# ----------------------------------------------------------------------------------------------------------
# issue 43: NaN and infinity pass no range comparison; a key given twice in a YAML file


@pytest.mark.parametrize("override", ["rollout.temperature=nan", "algo.gamma=nan", "mask.ratio=nan", "optim.lr=nan",
                                      "rollout.top_p=nan", "algo.dual_clip=nan", "algo.clip_ratio_high=nan",
                                      "trainer.lock_wait_s=nan", "optim.lr=inf", "algo.clip_ratio_high=inf",
                                      "trainer.collective_timeout_s=-inf"])
def test_nonfinite_numbers_are_refused(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}={float(value)!r}: not a finite number; must be a ")


def test_nan_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"^optim.lr=nan: not a finite number; must be a float > 0.0$"):
        load_config(path)


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  eps: 1.0e-7\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 4, column 3 malformed YAML \(duplicate key 'lr', first "
                                          r"given on line 2: give each key once\)$"):
        load_config(path)
    path.write_text("optim: {lr: 1.0e-3}\ntrainer: {steps: 3}\noptim: {eps: 1.0e-7}\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1 .*duplicate key 'optim', first given on line 1"):
        load_config(path)
    path.write_text("optim:\n  <<: {lr: 1.0e-3, eps: 1.0e-7}\n  lr: 2.0e-3\n")  # a merge key may be overridden
    assert (load_config(path).optim.lr, load_config(path).optim.eps) == (2.0e-3, 1.0e-7)
