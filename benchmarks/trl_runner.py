"""One measured training run for benchmarks/vs_trl.py — ours or TRL's — in its own process.

    .venv-trl/bin/python benchmarks/trl_runner.py --mode trl_papo --model-dir D --prompts 4 --n 8 --tokens 32 \
        --steps 6 --out run.json
    .venv-trl/bin/python benchmarks/trl_runner.py --build-checkpoint D      # the shared checkpoint (once)

Both sides get the same checkpoint (the tiny Qwen2.5-VL, random init, seed 0, saved as a Hugging Face directory
with a Qwen2_5_VLProcessor whose chat template writes exactly our `prompts.chat_prompt`), the same prompts per
step (our trainer's draw order; TRL reads them unshuffled), the same number of rollouts, response length,
temperature, learning rate and PAPO weights (SETTINGS), β = 0, one optimizer step per rollout, fp32.

Equal work: both sides generate exactly `--tokens` tokens per response — `min_new_tokens` = max_new_tokens
(TRL: `generation_kwargs`; ours: `SamplingParams.min_new_tokens`, which every backend honours), so EOS cannot end
a response early; at a paper-mini shape, each response's length imposed by its key instead (rollout/lengths.py:
ours through `SamplingParams.length_profile`, TRL's `generate` through the same logits processor, `impose_lengths`);
both also suppress the vision tokens (ours always does; a sampled <|image_pad|> would break TRL's forward). The run
JSON records the measured and the expected completion tokens per step.

Step time: wall seconds between consecutive step ends (TRL: a callback's `on_step_end`; ours: around
`PAPOTrainer.train_step`), so both include their data loading and per-step logging. Peak RSS: ru_maxrss.

Phases (each step's "phases_s", the same names on both sides; "detail_s" has the raw seams): wrappers put on
instance attributes at run time (trl and papo_engine are not modified; a wrapper costs two perf_counter calls and
a dict update, a few microseconds per step: PHASE_SEAMS says which calls are wrapped). Every mapped phase is a
disjoint piece of the step, so they sum to at most the step; "other" is the rest (data loading, logging, TRL's
batch split/shuffle, our metric reductions).
  rollout             ours: `trainer.encode` (prompt processing) + the hybrid's "rollout" phase (HF generate +
                      decode; + weight_sync/offload/sync_check where they run). TRL: `_generate` (chat template +
                      processor, `generate`, decode, length metrics).
  rewards_advantages  ours: `trainer.reward` + the "advantages" phase (group advantages; PAPO: image masks).
                      TRL: `_generate_and_score_completions` minus `_generate` and minus the old/ref log-prob passes:
                      its second processor pass over the images, padding, rewards, advantages, metrics.
  old_logprobs        ours: the "old_logprobs" phase (0 when reused on-policy). TRL: no-grad calls of
                      `_get_per_token_logps_and_entropies` (none here: num_iterations = 1 and β = 0).
  update              ours: the "update" phase. TRL: `compute_loss` (forward, PAPO: both branches and its image
                      mask) + `accelerator.backward` + `_clip_grad_norm` + on_pre_optimizer_step → on_step_end
                      (optimizer.step, scheduler, zero_grad).
  other               step − the four above.
detail_s: generate (the model's `generate` alone, both sides), update.forward / update.backward / update.optimizer
(ours: `engine.backward`, `engine.step`, the rest of "update" is forward + loss), rewards, and the raw seams.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the hyperparameters both sides share (our defaults; TRL's names in trl_config below)
SETTINGS = {"lr": 1e-3, "temperature": 1.0, "gamma": 0.02, "eta_orig": 0.0, "eta_mask": 0.0, "mask_ratio": 0.6,
            "clip_low": 0.2, "clip_high": 0.3, "perception_kl_clamp": 0.2, "seed": 0}
MODES = ("ours_grpo", "ours_papo_official", "ours_papo", "trl_grpo", "trl_grpo_malloc", "trl_papo",
         "trl_papo_malloc", "trl_papo_gc", "ours_papo_lora", "trl_papo_lora")
# the *_lora modes: the same LoRA on both sides (peft; ours model.lora.*, TRL's peft_config): rank 16, alpha 32, the
# language model's attention and MLP projections (papo_engine.lora's default targets), no dropout
LORA = {"rank": 16, "alpha": 32.0}
# Qwen2.5-VL chat layout, written so that TRL's prompts are token-for-token our `prompts.chat_prompt`
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


PHASES = ("rollout", "rewards_advantages", "old_logprobs", "update", "other")


class PhaseClock:
    """Wall seconds per named seam, summed within the current step; `take()` returns them and starts the next."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, owner, attr: str, name: str, when=None) -> None:
        """Replace `owner.attr` (an instance attribute, so only this object is affected) by a timed call; with
        `when`, only calls for which `when()` is true are timed."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls += 1

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def mapped_phases(step_s: float, rollout: float, rewards_advantages: float, old_logprobs: float,
                  update: float) -> dict[str, float]:
    phases = {"rollout": rollout, "rewards_advantages": rewards_advantages, "old_logprobs": old_logprobs,
              "update": update}
    phases["other"] = step_s - sum(phases.values())
    return phases


# TRL's seams (trl 1.7.1 GRPOTrainer, also PAPOTrainer's): (attribute, raw seam name, condition). `generate` is
# the model's own (the object TRL unwraps for generation), `backward` the accelerator's, the rest the trainer's.
PHASE_SEAMS = {"trl": [
    ("_generate_and_score_completions", "score", None),   # the whole rollout + scoring stage
    ("_generate", "rollout", None),                        # tokenize/process prompts, generate, decode
    ("generate", "generate", None),                        # the model's generate alone
    ("_calculate_rewards", "rewards", None),
    ("_get_per_token_logps_and_entropies", "old_logprobs", "no_grad_scoring"),
    ("compute_loss", "forward", None),                     # PAPO: both forwards, masking, loss
    ("backward", "backward", None),
    ("_clip_grad_norm", "clip", None),
]}


def make_processor(tokenizer, cfg):
    """A Qwen2_5_VLProcessor around our tokenizer, sized like our image processor (needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    images = Qwen2VLImageProcessor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=CHAT_TEMPLATE)


# model shapes of the shared checkpoint (benchmarks/shapes.py): the tiny default, a larger tiny one (so a ratio is
# not one model's), the real vocabulary, and the paper-mini shapes (a real run's proportions, imposed lengths)
sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes import SHAPES  # noqa: E402


def build_checkpoint(model_dir: str, shape: str) -> None:
    from papo_engine.config import load_config
    from papo_engine.models import load_policy, load_tokenizer
    cfg = load_config(None, SHAPES[shape].overrides)
    tokenizer = load_tokenizer(cfg.model)
    load_policy(cfg.model, tokenizer, seed=SETTINGS["seed"]).save_pretrained(model_dir)
    make_processor(tokenizer, cfg).save_pretrained(model_dir)


def data_overrides(shape: str) -> list[str]:
    """The shape's settings other than the model's (the checkpoint is the model): e.g. paper-mini's image size."""
    return [o for o in SHAPES[shape].overrides if not o.startswith("model.")]


def expected_tokens(args) -> list[int]:
    """Completion tokens each step must generate: every response at --tokens, or the shape's imposed lengths of that
    step's responses (keys step·rows + row: one rank, prompts taken in order)."""
    import torch
    rows = args.prompts * args.n
    profile = SHAPES[args.shape].length_profile()
    if profile is None:
        return [rows * args.tokens] * args.steps
    return [int(profile.lengths(torch.arange(s * rows, (s + 1) * rows)).clamp(max=args.tokens).sum())
            for s in range(args.steps)]


def step_samples(cfg, prompts: int, steps: int) -> list:
    """The samples our trainer draws in `steps` steps of `prompts` prompts (`PAPOTrainer.next_prompts`, 1 rank)."""
    import torch

    from papo_engine.data import GeneratedDataset
    ds = GeneratedDataset(cfg.data.task, "train", cfg.data.train_size, cfg.data.seed, cfg.data.image_size)
    out = []
    for key in range(prompts * steps):
        epoch, pos = divmod(key, len(ds))
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.data.seed * 1000 + epoch))
        out.append(ds[int(order[pos])])
    return out


def ours_overrides(args) -> list[str]:
    from papo_engine.config import official_overrides
    s = SETTINGS
    common = [f"model.path={args.model_dir}", "warmup.steps=0", "trainer.eval_samples=1", "trainer.save_every=0",
              "trainer.save_final=false", "logging.wandb=false", "logging.plot=false", f"trainer.steps={args.steps}",
              f"trainer.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.tokens}",
              f"rollout.temperature={s['temperature']}", f"optim.lr={s['lr']}", f"algo.gamma={s['gamma']}",
              f"algo.eta_orig={s['eta_orig']}", f"algo.eta_mask={s['eta_mask']}", f"mask.ratio={s['mask_ratio']}",
              f"algo.clip_ratio_low={s['clip_low']}", f"algo.clip_ratio_high={s['clip_high']}",
              "algo.ref_kl_coef=0", "model.dtype=float32", "model.gradient_checkpointing=false",
              f"trainer.seed={s['seed']}"]
    switches = {"ours_grpo": ["algo.gamma=0", "algo.eta_orig=0", "algo.eta_mask=0"],
                "ours_papo_official": official_overrides(), "ours_papo": [],
                "ours_papo_lora": [f"model.lora.rank={LORA['rank']}", f"model.lora.alpha={LORA['alpha']}"],
                }[args.mode]
    return common + switches


def run_ours(args, out_dir: str) -> list[dict]:
    from papo_engine.config import load_config
    from papo_engine.rollout.hf import HFRollout
    from papo_engine.trainer import PAPOTrainer
    cfg = load_config(None, [*ours_overrides(args), *data_overrides(args.shape), f"trainer.output_dir={out_dir}/run",
                             *args.ours])
    trainer = PAPOTrainer(cfg)
    if SHAPES[args.shape].lengths:  # each response's length imposed by its key (rollout/lengths.py)
        trainer.sampling.length_profile = SHAPES[args.shape].length_profile()
    else:  # fixed-length responses (eos held back, both backends)
        trainer.sampling.min_new_tokens = args.tokens
    clock = PhaseClock()
    clock.wrap(trainer, "encode", "encode")
    clock.wrap(trainer, "reward", "rewards")
    rollout = trainer.hybrid.rollout  # native: its generate; hf: the model's generate, as on TRL's side
    clock.wrap(rollout.model if isinstance(rollout, HFRollout) else rollout, "generate", "generate")
    clock.wrap(trainer.engine, "backward", "update.backward")
    clock.wrap(trainer.engine, "step", "update.optimizer")
    steps, last = [], time.perf_counter()
    for step in range(args.steps):
        metrics = trainer.train_step(step)
        now = time.perf_counter()
        sequences = args.prompts * args.n
        timer = {k[5:]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
        seams = clock.take()
        detail = {**timer, **seams}
        detail["update.forward"] = timer["update"] - seams["update.backward"] - seams["update.optimizer"]
        rollout = seams["encode"] + sum(timer.get(k, 0.0) for k in ("rollout", "weight_sync", "offload",
                                                                      "sync_check"))
        steps.append({"seconds": now - last, "completion_tokens": metrics["response_length"] * sequences,
                      "phases_s": mapped_phases(now - last, rollout, seams["rewards"] + timer["advantages"],
                                                timer.get("old_logprobs", 0.0), timer["update"]),
                      "detail_s": detail})
        last = now
    trainer.tracker.close()
    return steps, trained_sizes(trainer.engine.module, trainer.engine.optimizer)


def trl_config(args, out_dir: str):
    from trl import GRPOConfig
    from trl.experimental.papo import PAPOConfig

    from papo_engine.prompts import VISION_TOKENS
    from papo_engine.models import load_tokenizer
    from papo_engine.config import Config
    mcfg = Config().model
    mcfg.path = args.model_dir
    tokenizer = load_tokenizer(mcfg)
    s = SETTINGS
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=args.prompts * args.n, gradient_accumulation_steps=1,
        num_generations=args.n, max_completion_length=args.tokens, max_steps=args.steps, shuffle_dataset=False,
        temperature=s["temperature"], top_p=1.0, top_k=0, learning_rate=s["lr"], beta=0.0, epsilon=s["clip_low"],
        epsilon_high=s["clip_high"], loss_type="dapo", scale_rewards="group", num_iterations=1,
        gradient_checkpointing=args.mode == "trl_papo_gc", bf16=False, fp16=False, use_cpu=True, seed=s["seed"],
        adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        generation_kwargs={**({} if SHAPES[args.shape].lengths else {"min_new_tokens": args.tokens}),
                           "suppress_tokens": tokenizer.convert_tokens_to_ids(VISION_TOKENS)})
    if args.mode.startswith("trl_grpo"):
        return GRPOConfig(**common)
    return PAPOConfig(**common, perception_loss_weight=s["gamma"], mask_ratio=s["mask_ratio"], mask_type="random",
                      der_loss_weight1=s["eta_orig"], der_loss_weight2=s["eta_mask"])


def lora_config():
    """TRL's side of the *_lora modes: peft's LoraConfig with our targets (papo_engine.lora.target_pattern)."""
    from papo_engine import lora
    from papo_engine.config import LoraSettings
    settings = LoraSettings(rank=LORA["rank"], alpha=LORA["alpha"])
    return lora.peft_config(settings, lora.target_pattern(settings))


def trained_sizes(model, optimizer) -> dict:
    """Trainable parameters and the optimizer's state (bytes of its tensors: Adam's moments, step counters)."""
    import torch
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state)}


def run_trl(args, out_dir: str) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOTrainer
    from trl.experimental.papo import PAPOTrainer

    from papo_engine.config import Config
    from papo_engine.prompts import FORMAT_INSTRUCTION, SYSTEM_PROMPT
    from papo_engine.rewards import accuracy_format_reward

    from papo_engine.config import load_config
    samples = step_samples(load_config(None, data_overrides(args.shape)), args.prompts, args.steps)
    data = Dataset.from_dict({
        "prompt": [[{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"{x.question} {FORMAT_INSTRUCTION}"}] for x in samples],
        "image": [x.image for x in samples], "answer": [x.answer for x in samples]})

    def reward(completions, answer, **_):
        return [accuracy_format_reward(c[0]["content"], a)["reward"] for c, a in zip(completions, answer)]

    phases = PhaseClock()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.lengths, self.seams = [], [], []
            self.optimizer_start = None

        def on_train_begin(self, *_, **__):
            self.ends.append(time.perf_counter())

        def on_pre_optimizer_step(self, *_, **__):
            self.optimizer_start = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            phases.add("optimizer", now - self.optimizer_start)
            self.ends.append(now)
            self.seams.append(phases.take())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    torch.manual_seed(SETTINGS["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    clock = StepClock()
    cls = GRPOTrainer if args.mode.startswith("trl_grpo") else PAPOTrainer
    trainer = cls(model=model, reward_funcs=reward, args=trl_config(args, out_dir), train_dataset=data,
                  processing_class=AutoProcessor.from_pretrained(args.model_dir), callbacks=[clock],
                  peft_config=lora_config() if args.mode.endswith("_lora") else None)
    model = trainer.model if args.mode.endswith("_lora") else model  # TRL wrapped it (PeftModel)
    scoring = [False]  # inside `_generate_and_score_completions`: its no-grad log-prob passes are old / ref

    def scored(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            scoring[0] = True
            try:
                return fn(*a, **k)
            finally:
                scoring[0] = False
        return inner

    conditions = {None: None, "no_grad_scoring": lambda: scoring[0] and not torch.is_grad_enabled()}
    for attr, name, when in PHASE_SEAMS["trl"]:
        owner = model if attr == "generate" else trainer.accelerator if attr == "backward" else trainer
        phases.wrap(owner, attr, name, when=conditions[when])
    trainer._generate_and_score_completions = scored(trainer._generate_and_score_completions)
    if SHAPES[args.shape].lengths:
        impose_lengths(model, args, trainer.processing_class.tokenizer.eos_token_id)
    trainer.train()
    if len(clock.lengths) != args.steps:
        raise RuntimeError(f"TRL logged {len(clock.lengths)} steps' completion lengths, expected {args.steps}")
    steps = []
    for a, b, length, seams in zip(clock.ends, clock.ends[1:], clock.lengths, clock.seams):
        missing = {"score", "rollout", "generate", "forward", "backward"} - set(seams)
        if missing:  # a seam that never fired: trl's internals moved, and the profile would be wrong
            raise RuntimeError(f"TRL phase seams not reached in a step: {sorted(missing)}")
        old = seams.get("old_logprobs", 0.0)
        update = seams["forward"] + seams["backward"] + seams.get("clip", 0.0) + seams["optimizer"]
        detail = {**seams, "update.forward": seams["forward"], "update.backward": seams["backward"],
                  "update.optimizer": seams.get("clip", 0.0) + seams["optimizer"]}
        steps.append({"seconds": b - a, "completion_tokens": length * args.prompts * args.n,
                      "phases_s": mapped_phases(b - a, seams["rollout"], seams["score"] - seams["rollout"] - old,
                                                old, update),
                      "detail_s": detail})
    return steps, trained_sizes(model, trainer.optimizer)


def impose_lengths(model, args, eos: int) -> None:
    """TRL's generate ends each response at the shape's imposed length, as ours does: the same rule
    (rollout/lengths.ImposedLengths) on the same keys (generate call s holds step s's rows, prompt-major)."""
    import torch
    from transformers import LogitsProcessorList
    from papo_engine.rollout.lengths import ImposedLengths

    profile, rows, generate, calls = SHAPES[args.shape].length_profile(), args.prompts * args.n, model.generate, [0]

    @functools.wraps(generate)
    def with_lengths(*a, **k):
        if len(k["input_ids"]) != rows:
            raise RuntimeError(f"TRL generated {len(k['input_ids'])} rows in one call, expected {rows}")
        keys = torch.arange(calls[0] * rows, (calls[0] + 1) * rows)
        calls[0] += 1
        lengths = profile.lengths(keys).clamp(max=args.tokens)
        return generate(*a, **k, logits_processor=LogitsProcessorList(
            [ImposedLengths(lengths, eos, k["input_ids"].shape[1])]))
    model.generate = with_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-checkpoint", metavar="DIR", help="save the shared checkpoint to DIR and exit")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--model-dir")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", help="the run's JSON")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="the checkpoint's shape (--build-checkpoint), and a run's data settings and lengths")
    parser.add_argument("--ours", nargs="*", default=[], help="extra overrides for our modes (e.g. rollout.backend=hf)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.build_checkpoint:
        build_checkpoint(args.build_checkpoint, args.shape)
        return
    if not (args.mode and args.model_dir and args.out):
        parser.error("--mode, --model-dir and --out are required")
    with tempfile.TemporaryDirectory() as out_dir:
        steps, sizes = (run_ours if args.mode.startswith("ours_") else run_trl)(args, out_dir)
    import torch
    for step, expected in zip(steps, expected_tokens(args)):
        step["expected_completion_tokens"] = expected
    report = {"mode": args.mode, "prompts": args.prompts, "n": args.n, "tokens": args.tokens, "steps": steps, **sizes,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
