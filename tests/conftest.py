"""Shared test setup: CPU run-time environment (before triton/deepspeed import) and small shared fixtures."""
import os

import torch

# interpreted Triton only where there is no GPU (must be decided before triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache",
                                   "torch_extensions"))

# two xdist workers on 2 cores (scripts/test.sh): one torch thread each, inherited by the trainings they start —
# two 2-thread torch processes on 2 cores slow each other down many times over
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest  # noqa: E402

# the longest files first, so that neither worker is left with one of them at the end (`--dist loadfile` hands
# files out in collection order)
LONG_FIRST = ("test_warmup.py", "test_two_namespaces.py", "test_preemption.py", "test_on_policy_reuse.py",
              "test_resume.py", "test_multirank.py", "test_launchers.py", "test_lora.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept otherwise


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launcher_env_stays_per_test():
    """A test that runs the trainer in this process sets RANK / MASTER_PORT (distributed.prepare_environment) and
    its process group keeps MASTER_PORT bound: later tests' subprocesses must not inherit that port."""
    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny():
    """The embedded default's tokenizer, image processor and a tiny model (random init, seed 0)."""
    from papo_engine.config import Config
    from papo_engine.head import FusedLMHead
    from papo_engine.models import load_image_processor, load_policy, load_tokenizer

    cfg = Config()
    tokenizer = load_tokenizer(cfg.model)
    processor = load_image_processor(cfg)
    model = load_policy(cfg.model, tokenizer, seed=0)
    FusedLMHead.replace_in(model, fused=True, backend="torch")
    return cfg, tokenizer, processor, model
