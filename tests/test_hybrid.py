"""Hybrid engine: whole-layer weight buckets (ZeRO-0 and ZeRO-3), the vLLM rollout driven through a stand-in of GPU
vLLM (tests/fake_vllm.py, real generation with the tiny Qwen2.5-VL) for what CPU vLLM cannot show (sleep / wake,
the GPU push path, offload order), call order per training step, the sync check, the output contract shared
with HFRollout. Real vLLM (the CPU build): tests/test_vllm_real.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_vllm  # noqa: E402
from model_copies import perturbed  # noqa: E402

from papo_engine.batching import select_prompts  # noqa: E402
from papo_engine.config import Config, ConfigError  # noqa: E402
from papo_engine.data import GeneratedDataset  # noqa: E402
from papo_engine.hybrid import HybridEngine  # noqa: E402
from papo_engine.trainer import Timer  # noqa: E402
from papo_engine.models import encode_prompts  # noqa: E402
from papo_engine.rollout import build_rollout  # noqa: E402
from papo_engine.rollout.base import SamplingParams, response_mask_from_ids  # noqa: E402
from papo_engine.rollout.hf import HFRollout  # noqa: E402
from papo_engine.rollout.native import NativeRollout  # noqa: E402
from papo_engine.rollout.vllm import VLLMRollout, collapse_image_pads  # noqa: E402
from papo_engine.weight_sync import checkpoint_names, iter_weight_buckets, layer_of  # noqa: E402
from papo_engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# helpers


class FakeDeepSpeed:
    def __init__(self, log):
        self.log = log

    def offload_states(self, include=None):
        self.log.append(("offload_states", None if include is None else sorted(x.value for x in include)))

    def reload_states(self):
        self.log.append(("reload_states",))


class FakeTrainingEngine:
    """TrainingEngine's surface used by HybridEngine: .module, .zero_stage, .engine (offload/reload)."""

    def __init__(self, module, log=None, zero_stage=0):
        self.module, self.zero_stage = module, zero_stage
        self.engine = FakeDeepSpeed(log if log is not None else [])


def layers_whole_and_within(buckets: list[list[str]], sizes: dict[str, int], limit: int) -> bool:
    """Every layer (`layer_of`, module names) sits in one bucket; a bucket over `limit` holds a single layer."""
    home = {}
    for i, names in enumerate(buckets):
        for n in names:
            if home.setdefault(layer_of(n), i) != i:
                return False
    return all(sum(sizes[n] for n in names) <= limit or len({layer_of(n) for n in names}) == 1 for names in buckets)


def test_layer_of_keeps_fused_tensors_together():
    assert layer_of("model.language_model.layers.3.self_attn.q_proj.weight") == "model.language_model.layers.3"
    assert layer_of("model.language_model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3"
    assert layer_of("model.visual.blocks.1.attn.qkv.bias") == "model.visual.blocks.1"
    assert layer_of("model.visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0"
    assert layer_of("lm_head.weight") == "lm_head"
    assert layer_of("model.language_model.embed_tokens.weight") == "model.language_model.embed_tokens"


def cfg_for(model_dir, **rollout):
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.rollout.backend = "vllm"
    cfg.rollout.sync_check = False
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    _, tokenizer, processor, model = tiny
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer, processor, _ = tiny
    ds = GeneratedDataset("shape_color", "train", 8, seed=0, image_size=56)
    samples = [ds[i] for i in range(3)]
    return encode_prompts([s.question for s in samples], [s.images for s in samples], tokenizer, processor)


@pytest.fixture(autouse=True)
def launcher_env(monkeypatch):
    """What torchrun/deepspeed (or papo_engine.distributed.prepare_environment) provide in a real run."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # the rollout must set it; undone after


def make_rollout(cfg, tokenizer, **kwargs):
    return VLLMRollout(cfg, tokenizer, vllm_module=fake_vllm, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# weight buckets


def test_buckets_cover_every_parameter_once_under_checkpoint_names_within_the_limit(tiny, tmp_path):
    _, _, _, model = tiny
    trainer = perturbed(model)
    trainer.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    limit = 64 * 1024
    module_name = {v: k for k, v in checkpoint_names(trainer).items()}
    seen, buckets = {}, []
    for bucket in iter_weight_buckets(trainer, zero_stage=0, bucket_bytes=limit):
        buckets.append([module_name[name] for name, _ in bucket])
        for name, t in bucket:
            assert name not in seen, f"{name} pushed twice"
            seen[name] = t.clone()
    sizes = {n: p.numel() * p.element_size() for n, p in trainer.named_parameters()}
    assert len(buckets) > 3, buckets
    assert layers_whole_and_within(buckets, sizes, limit), buckets
    assert ["model.language_model.embed_tokens.weight"] in buckets  # larger than a bucket: alone
    assert set(seen) == set(saved)  # exactly what save_pretrained writes
    for name, t in seen.items():
        assert torch.equal(t, saved[name]), name
    assert set(checkpoint_names(trainer).values()) == set(saved)



@pytest.mark.slow
def test_zero3_single_process_gathers_full_tensors_per_bucket(tmp_path):
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, __file__, "zero3", str(out)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    v = json.loads(out.read_text())
    assert v["partitioned_before"] and v["partitioned_after"]  # ZeRO-3 really held shards only
    assert v["mismatched"] == [] and v["missing"] == [] and v["duplicates"] == []
    assert v["buckets"] > 3 and v["whole_layers"]


def _zero3_main(out_path: str) -> None:
    """Subprocess body: DeepSpeed ZeRO-3 on one gloo rank; buckets must equal the unpartitioned weights."""
    from papo_engine.distributed import init_distributed
    init_distributed()
    from papo_engine.config import load_config
    from papo_engine.engine import TrainingEngine
    from papo_engine.head import FusedLMHead
    from papo_engine.models import load_policy, load_tokenizer

    cfg = load_config(None, ["deepspeed.zero_stage=3", "trainer.micro_batch_size=2"])
    model = load_policy(cfg.model, load_tokenizer(cfg.model), seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))
    reference = {checkpoint_names(model)[n]: p.detach().clone() for n, p in model.named_parameters()}
    engine = TrainingEngine(model, cfg, 1)
    params = list(engine.module.parameters())
    verdict = {"partitioned_before": all(p.numel() == 0 for p in params), "limit": 48 * 1024,
               "mismatched": [], "duplicates": [], "sizes": []}
    seen, buckets = set(), []
    module_name = {v: k for k, v in checkpoint_names(model).items()}
    for bucket in iter_weight_buckets(engine.module, zero_stage=3, bucket_bytes=verdict["limit"]):
        verdict["sizes"].append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
        buckets.append([module_name[name] for name, _ in bucket])
        for name, t in bucket:
            if name in seen:
                verdict["duplicates"].append(name)
            seen.add(name)
            if name not in reference or not torch.equal(t.float(), reference[name].float()):
                verdict["mismatched"].append(name)
    verdict["missing"] = sorted(set(reference) - seen)
    verdict["buckets"] = len(verdict["sizes"])
    verdict["whole_layers"] = layers_whole_and_within(
        buckets, {n: int(p.ds_numel) * p.element_size() for n, p in engine.module.named_parameters()}, verdict["limit"])
    verdict["partitioned_after"] = all(p.numel() == 0 for p in params)
    Path(out_path).write_text(json.dumps(verdict))


# ----------------------------------------------------------------------------------------------------------
# the rollout engine through the stand-in


def test_vllm_needs_model_path_and_builds_like_the_trainer(tiny, model_dir):
    cfg, tokenizer, _, model = tiny
    plain = Config()
    plain.rollout.backend = "vllm"
    with pytest.raises(ConfigError, match="model.path"):
        VLLMRollout(plain, tokenizer, vllm_module=fake_vllm)
    assert isinstance(build_rollout(Config(), model, tokenizer, world_size=1), NativeRollout)  # the default
    hf_cfg = Config()
    hf_cfg.rollout.backend = "hf"
    hf = build_rollout(hf_cfg, model, tokenizer, world_size=1)
    assert isinstance(hf, HFRollout) and not hf.synced_gpus
    vcfg = cfg_for(model_dir)
    rollout = build_rollout(vcfg, model, tokenizer, world_size=1, vllm_module=fake_vllm)
    assert isinstance(rollout, VLLMRollout)
    kw = rollout.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 1
    assert kw["enable_sleep_mode"] is True and kw["worker_extension_cls"].endswith("PAPOWorkerExtension")
    assert kw["mm_processor_cache_gb"] == 0 and kw["limit_mm_per_prompt"] == {"image": 4, "video": 0}
    assert kw["mm_processor_kwargs"] == {"min_pixels": vcfg.data.min_pixels, "max_pixels": vcfg.data.max_pixels}
    assert kw["dtype"] == vcfg.model.dtype and kw["generation_config"] == "vllm"
    assert kw["logprobs_mode"] == "processed_logprobs" and "enable_chunked_prefill" not in kw  # GPU: chunked ok
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert rollout.llm.calls == [("sleep", 1)]  # memory goes back to the trainer right away


def test_on_cpu_vllm_sleep_mode_is_off_with_one_log_line_and_chunked_prefill_off(tiny, model_dir, monkeypatch,
                                                                                  caplog):
    _, tokenizer, _, _ = tiny
    monkeypatch.setattr(fake_vllm, "platforms", type(fake_vllm.platforms)(
        current_platform=type(fake_vllm.platforms.current_platform)(is_cpu=lambda: True)))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with caplog.at_level(logging.INFO, logger="papo_engine.rollout.vllm"):
        rollout = make_rollout(cfg_for(model_dir, kv_cache_mb=32), tokenizer)
    kw = rollout.llm.kwargs
    assert rollout.on_cpu and not rollout.sleep_mode and kw["enable_sleep_mode"] is False
    assert [r.getMessage() for r in caplog.records if "sleep mode" in r.getMessage()] == [
        "vLLM on CPU has no sleep mode: the engine keeps its weights and KV cache while training"]
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] >= 16384
    assert kw["kv_cache_memory_bytes"] == 32 * 2**20 and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert rollout.llm.calls == []  # never put to sleep


def test_plain_process_gets_the_launcher_environment_and_keeps_its_rng(tiny, model_dir, monkeypatch):
    """`papo eval` runs under plain python: external_launcher needs RANK etc.; construction reseeds globally."""
    import random

    import numpy as np
    _, tokenizer, _, _ = tiny
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    real_init = fake_vllm.LLM.__init__

    def reseeding_init(self, model, **kwargs):  # what vLLM does: seed + rank into every global generator
        random.seed(kwargs["seed"]), np.random.seed(kwargs["seed"]), torch.manual_seed(kwargs["seed"])
        real_init(self, model, **kwargs)

    monkeypatch.setattr(fake_vllm.LLM, "__init__", reseeding_init)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    make_rollout(cfg_for(model_dir), tokenizer)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert os.environ["RANK"] == os.environ["LOCAL_RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert int(os.environ["MASTER_PORT"]) > 0


def test_rollout_reports_the_engines_sampled_token_logprobs(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    out = rollout.generate(prompts, SamplingParams(2, 1.0, 1.0, 5, seed=1), prompt_keys=[0, 1, 2])
    assert all(sp.logprobs == 0 for sp in rollout.llm.seen_params)
    assert out.logprobs.shape == out.response_ids.shape
    assert bool((out.logprobs[out.response_mask == 0] == 0).all())
    assert bool((out.logprobs[out.response_mask == 1] < 0).all())


def test_collapse_image_pads():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 9, 3], 9) == ([1, 9, 2, 9, 3], 2)
    assert collapse_image_pads([9], 9) == ([9], 1)


def test_call_order_per_step_and_one_push_per_step(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    cfg = cfg_for(model_dir)
    rollout = make_rollout(cfg, tokenizer)
    llm = rollout.llm
    llm.calls.clear()
    hybrid = HybridEngine(FakeTrainingEngine(perturbed(model)), rollout, cfg)
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=3)
    timer = Timer()
    hybrid.generate(prompts, sampling, timer)
    hybrid.generate(prompts, sampling, timer, prompt_keys=[3, 4, 5])  # DAPO regeneration, same step: no push
    assert [sp.seed is not None for sp in llm.seen_params] == [False] * 3  # sampling.seed None: unkeyed
    kinds = [c[0] for c in llm.calls]
    loads = kinds.count("load")
    assert loads >= 1
    after_generate = ["generate", "reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache", "sleep"]
    assert llm.calls[0] == ("wake_up", ("weights",))
    assert kinds[1:1 + loads] == ["load"] * loads
    assert llm.calls[1 + loads] == ("wake_up", ("kv_cache",))
    assert kinds[2 + loads:] == after_generate + ["wake_up"] + after_generate
    assert llm.calls[-1] == ("sleep", 1) and llm.calls[2 + loads + len(after_generate)] == ("wake_up", None)
    assert set(timer.seconds) == {"weight_sync", "rollout"}

    llm.calls.clear()
    hybrid.mark_weights_updated()  # next step: pushed again, once
    hybrid.generate(prompts, sampling, timer)
    kinds = [c[0] for c in llm.calls]
    assert kinds[0] == "wake_up" and kinds.count("load") == loads and kinds.count("generate") == 1
    assert hybrid.syncs == 2 and hybrid.last_sync_stats["tensors"] == len(list(model.parameters()))


def test_every_parameter_pushed_once_per_step_with_the_trainers_values(tiny, model_dir, prompts, tmp_path):
    _, tokenizer, _, model = tiny
    trainer = perturbed(model)
    trainer.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved_names = set(f.keys())
    cfg = cfg_for(model_dir, weight_sync_bucket_mb=1)
    rollout = make_rollout(cfg, tokenizer)
    engine_model = rollout.llm.hf_model
    assert not torch.equal(engine_model.lm_head.weight, trainer.lm_head.weight)  # a missing push would show
    hybrid = HybridEngine(FakeTrainingEngine(trainer), rollout, cfg)
    hybrid.generate(prompts, SamplingParams(2, 1.0, 1.0, 2), None)
    pushed = [n for c in rollout.llm.calls if c[0] == "load" for n in c[1]]
    assert len(pushed) == len(set(pushed)) == len(saved_names)
    assert set(pushed) == saved_names
    mine = dict(trainer.named_parameters())
    for name, p in engine_model.named_parameters():
        assert torch.equal(p, mine[name]), name


def test_small_buckets_through_the_engine(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    cfg = cfg_for(model_dir)
    rollout = make_rollout(cfg, tokenizer)
    trainer = perturbed(model)
    limit = 32 * 1024
    stats = rollout.sync_weights(iter_weight_buckets(trainer, 0, limit))
    loads = [c[1] for c in rollout.llm.calls if c[0] == "load"]
    assert stats["buckets"] == len(loads) > 3
    params = {checkpoint_names(trainer)[n]: p for n, p in trainer.named_parameters()}
    module_name = {v: k for k, v in checkpoint_names(trainer).items()}
    sizes = {n: p.numel() * p.element_size() for n, p in trainer.named_parameters()}
    assert layers_whole_and_within([[module_name[n] for n in names] for names in loads], sizes, limit)
    assert sorted(n for names in loads for n in names) == sorted(params)


def test_offload_states_wrap_the_rollout_and_parameters_leave_after_the_push(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    cfg = cfg_for(model_dir)
    cfg.deepspeed.offload_states_during_rollout = True
    rollout = make_rollout(cfg, tokenizer)
    log = rollout.llm.calls
    log.clear()
    hybrid = HybridEngine(FakeTrainingEngine(perturbed(model), log=log), rollout, cfg)
    timer = Timer()
    hybrid.generate(prompts, SamplingParams(2, 1.0, 1.0, 2), timer)
    kinds = [c[0] for c in log]
    assert kinds[0] == "offload_states" and "lp_params" not in log[0][1] and "optim_states" in log[0][1]
    second = kinds.index("offload_states", 1)
    assert log[second] == ("offload_states", ["lp_params"])
    assert log[1] == ("wake_up", ("weights",))
    assert kinds.index("load") < second < log.index(("wake_up", ("kv_cache",)))  # after the push, before KV
    assert kinds[-2:] == ["sleep", "reload_states"]
    log.clear()
    hybrid.generate(prompts, SamplingParams(2, 1.0, 1.0, 2), timer)  # same step: everything offloaded at once
    assert log[0] == ("offload_states", None) and [c[0] for c in log][-1] == "reload_states"
    assert "load" not in [c[0] for c in log]
    assert {"offload", "weight_sync", "rollout"} <= set(timer.seconds)


def test_without_sleep_mode_no_sleep_calls_but_same_push_and_cache_resets(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    cfg = cfg_for(model_dir, enable_sleep_mode=False)
    rollout = make_rollout(cfg, tokenizer)
    assert rollout.llm.calls == [] and rollout.llm.kwargs["enable_sleep_mode"] is False
    hybrid = HybridEngine(FakeTrainingEngine(perturbed(model)), rollout, cfg)
    hybrid.generate(prompts, SamplingParams(2, 1.0, 1.0, 2), None)
    kinds = [c[0] for c in rollout.llm.calls]
    assert "sleep" not in kinds and "wake_up" not in kinds
    assert kinds[-4:] == ["generate", "reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache"]
    assert kinds[:-4] == ["load"] * (len(kinds) - 4) and len(kinds) > 4


def test_engine_refuses_work_while_asleep(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    with pytest.raises(RuntimeError, match="asleep"):
        rollout.llm.generate([{"prompt_token_ids": [1, 2]}], fake_vllm.SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="asleep"):
        rollout.llm.collective_rpc("papo_load_weights", args=([("lm_head.weight", model.lm_head.weight)],))
    # a full push first wakes the weights, then loads
    rollout.sync_weights(iter_weight_buckets(model, 0, 1 << 20))
    assert rollout.sleeping == set()


def test_sync_check_detects_stale_weights_and_passes_after_a_push(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    trainer = perturbed(model)
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    assert rollout.sync_check(prompts, trainer) < 1.0  # engine still holds the checkpoint's weights
    rollout.sync_weights(iter_weight_buckets(trainer, 0, 1 << 20))
    assert rollout.sync_check(prompts, trainer) == 1.0


def test_hybrid_runs_the_sync_check_once_and_warns_on_mismatch(tiny, model_dir, prompts, monkeypatch, caplog):
    _, tokenizer, _, model = tiny
    cfg = cfg_for(model_dir, sync_check=True)
    hybrid = HybridEngine(FakeTrainingEngine(perturbed(model)), make_rollout(cfg, tokenizer), cfg)
    sampling = SamplingParams(2, 1.0, 1.0, 2)
    timer = Timer()
    hybrid.generate(prompts, sampling, timer)
    assert hybrid.last_sync_check == 1.0 and "sync_check" in timer.seconds
    hybrid.mark_weights_updated()
    hybrid.last_sync_check = None
    hybrid.generate(prompts, sampling, timer)
    assert hybrid.last_sync_check is None  # only after the first push

    import papo_engine.weight_sync as ws
    monkeypatch.setattr(ws, "iter_weight_buckets", lambda *a, **k: iter(()))  # a push that sends nothing
    broken = HybridEngine(FakeTrainingEngine(perturbed(model)), make_rollout(cfg, tokenizer), cfg)
    with caplog.at_level(logging.WARNING, logger="papo_engine.hybrid"):
        broken.generate(prompts, sampling, None)
    assert broken.last_sync_check < 1.0
    assert any("sync check" in r.getMessage() for r in caplog.records)


def test_greedy_output_equals_hf_rollout_prompt_major(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    trainer = perturbed(model)
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    rollout.sync_weights(iter_weight_buckets(trainer, 0, 1 << 20))
    greedy = SamplingParams(n=2, temperature=0.0, top_p=1.0, max_new_tokens=5)
    mine = rollout.generate(prompts, greedy)
    theirs = HFRollout(trainer, tokenizer, batch_size=64).generate(prompts, greedy)
    assert mine.response_ids.shape == theirs.response_ids.shape == (3 * 2, theirs.response_ids.shape[1])
    assert torch.equal(mine.response_ids, theirs.response_ids)
    assert torch.equal(mine.response_mask, theirs.response_mask) and mine.response_mask.dtype == torch.float32
    assert mine.texts == theirs.texts
    # prompt-major: row g*n + k answers prompt g; each prompt alone gives its own rows
    for g in range(3):
        alone = rollout.generate(select_prompts(prompts, [g]), greedy)
        assert torch.equal(alone.response_ids[:, :mine.response_ids.shape[1]],
                           mine.response_ids[2 * g:2 * g + 2, :alone.response_ids.shape[1]])


def test_mask_convention_eos_included_pad_after(tiny, model_dir, prompts, monkeypatch):
    """Engine outputs of every shape (EOS early/late/absent, completions listed out of order) become HFRollout's
    layout: prompt-major rows, pad after the EOS, mask 1 through the EOS (response_mask_from_ids)."""
    _, tokenizer, _, _ = tiny
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    canned = {0: [[5, 6, eos], [7, eos]], 1: [[8, 9, 10, 11], [12, eos]], 2: [[eos], [13, 14, 15, 16]]}
    engine_generate = rollout.llm.generate

    def canned_generate(requests, sampling_params, **kwargs):
        outs = engine_generate(requests, sampling_params, **kwargs)  # real expansion and sleep checks
        for g, o in enumerate(outs):
            o.outputs = [fake_vllm.CompletionOutput(k, "", ids, "stop") for k, ids in enumerate(canned[g])][::-1]
        return outs

    monkeypatch.setattr(rollout.llm, "generate", canned_generate)
    out = rollout.generate(prompts, SamplingParams(2, 1.0, 1.0, 4))
    expected = torch.tensor([[5, 6, eos, pad], [7, eos, pad, pad], [8, 9, 10, 11], [12, eos, pad, pad],
                             [eos, pad, pad, pad], [13, 14, 15, 16]])
    assert torch.equal(out.response_ids, expected)
    assert torch.equal(out.response_mask, response_mask_from_ids(expected, eos))
    assert out.response_mask.tolist()[1] == [1.0, 1.0, 0.0, 0.0] and out.response_mask.tolist()[2] == [1.0] * 4
    assert out.texts == tokenizer.batch_decode(expected.masked_fill(out.response_mask == 0, pad),
                                               skip_special_tokens=True)


def test_keyed_sampling_gives_a_prompt_the_same_responses_in_any_batch(tiny, model_dir, prompts):
    _, tokenizer, _, model = tiny
    rollout = make_rollout(cfg_for(model_dir), tokenizer)
    rollout.sync_weights(iter_weight_buckets(perturbed(model), 0, 1 << 20))
    keyed = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=7)
    together = rollout.generate(prompts, keyed, prompt_keys=[40, 41, 42])
    seeds = [sp.seed for sp in rollout.llm.seen_params]
    assert len(set(seeds)) == 3 and seeds[1] - seeds[0] == keyed.n  # child k draws with seed + k: no overlap
    alone = rollout.generate(select_prompts(prompts, [1]), keyed, prompt_keys=[41])
    w = min(alone.response_ids.shape[1], together.response_ids.shape[1])
    assert torch.equal(alone.response_ids[:, :w], together.response_ids[2:4, :w])
    other = rollout.generate(select_prompts(prompts, [1]), keyed, prompt_keys=[99])
    assert not torch.equal(other.response_ids, alone.response_ids)  # the key, not the position, seeds it
    unkeyed = rollout.generate(prompts, SamplingParams(2, 1.0, 1.0, 5))
    assert unkeyed.response_ids.shape[0] == 6 and rollout.llm.seen_params[0].seed is None


def test_engine_image_sizing_must_match_the_trainers(tiny, model_dir, prompts):
    _, tokenizer, _, _ = tiny
    cfg = cfg_for(model_dir)
    bigger = {"mm_processor_kwargs": {"min_pixels": 4 * cfg.data.min_pixels, "max_pixels": cfg.data.max_pixels}}
    rollout = make_rollout(cfg, tokenizer, engine_kwargs=bigger)
    with pytest.raises(RuntimeError, match="expanded it to"):
        rollout.generate(prompts, SamplingParams(1, 0.0, 1.0, 1))
    assert rollout.sleeping == {"weights", "kv_cache"}  # put back to sleep even on failure


def test_hf_backend_just_generates(tiny, prompts):
    _, tokenizer, _, model = tiny
    cfg = Config()
    hybrid = HybridEngine(FakeTrainingEngine(model), HFRollout(model, tokenizer, 64), cfg)
    timer = Timer()
    keyed = SamplingParams(2, 1.0, 1.0, 2, seed=3)
    out = hybrid.generate(prompts, keyed, timer, prompt_keys=[0, 1, 2])
    assert out.response_ids.shape[0] == 6 and set(timer.seconds) == {"rollout"}
    again = hybrid.generate(select_prompts(prompts, [2, 0, 1]), keyed, None, prompt_keys=[2, 0, 1])
    w = min(again.response_ids.shape[1], out.response_ids.shape[1])
    assert torch.equal(again.response_ids[:2, :w], out.response_ids[4:6, :w])  # keyed: same prompt, same draws


if __name__ == "__main__":
    if sys.argv[1] == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _zero3_main(sys.argv[2])
