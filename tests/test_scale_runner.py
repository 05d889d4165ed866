"""The runner with the large-model options: the base streamed into its shards, scanned
layers, activation constraints on a 2x2x2 mesh, bf16 / int8 storage; and their config
checks (one line naming the key, before anything loads)."""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from peft_jax.config import ConfigError

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config, write_task, write_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("scale")
    return write_tiny_bert(str(root / "model"), minilm_path, dropout=0.0), write_task(str(root / "data")), root


def _run(cfg):
    from peft_jax.experiment import run_experiment
    return run_experiment(cfg)


def _delta_file(workdir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "delta", "delta.safetensors"))


def test_scanned_sharded_run_equals_single_device(tiny):
    """scan_layers on a 2x2x2 (data, fsdp, tensor) mesh, the base streamed into its shards
    and activations constrained == the same run on one device; the delta file keeps the
    per-layer layout."""
    model, task, root = tiny
    one = _run(tiny_config(model, task, str(root / "one"), "lora", **{"model.scan_layers": True}))
    eight = _run(tiny_config(model, task, str(root / "eight"), "lora", **{
        "model.scan_layers": True, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    frozen = jax.tree.leaves(eight.frozen)
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated for a in frozen)
    assert "layers" in eight.frozen["params"]["encoder"]
    a, b = _delta_file(str(root / "one")), _delta_file(str(root / "eight"))
    assert sorted(a) == sorted(b) and any("/layer_1/" in k for k in a)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    assert eight.row["metrics"] == pytest.approx(one.row["metrics"], abs=1e-6)


def test_base_identity_does_not_depend_on_storage(tiny):
    """The base hash names the checkpoint: the same for fp32 / bf16 / int8 storage, scanned
    or not, streamed into shards or loaded on the host, and equal to the in-memory hash."""
    from peft_jax.experiment import build_experiment
    from peft_jax.models.registry import load_pretrained
    from peft_jax.peft.delta_io import base_fingerprint
    from peft_jax.parallel.mesh import make_mesh

    model, task, root = tiny
    want = base_fingerprint(load_pretrained(model, with_tokenizer=False).base)
    for over in ({}, {"model.scan_layers": True, "model.param_dtype": "bfloat16"},
                 {"model.quantize": "int8", "model.scan_layers": True}):
        cfg = tiny_config(model, task, str(root / "h"), "lora", **over)
        assert build_experiment(cfg, mesh=make_mesh({"fsdp": 4})).base_hash == want, over
        assert build_experiment(cfg).base_hash == want, over


@pytest.mark.slow
def test_bf16_and_int8_bases_train_and_delta_moves_between_them(tiny):
    model, task, root = tiny
    bf16 = _run(tiny_config(model, task, str(root / "bf16"), "lora", **{"model.param_dtype": "bfloat16"}))
    dtypes = {a.dtype for a in jax.tree.leaves(bf16.frozen["params"])}
    assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(bf16.state.trainable)} == {np.dtype(np.float32)}
    q = _run(tiny_config(model, task, str(root / "int8"), "lora,bitfit", **{
        "model.quantize": "int8", "model.scan_layers": True, "mesh.fsdp": 4}))
    kernels = [a for p, a in jax.tree_util.tree_flatten_with_path(q.frozen["params"])[0]
               if p[-1].key == "kernel"]
    assert kernels and all(k.dtype == np.int8 for k in kernels)
    assert np.isfinite(q.row["metrics"]["accuracy"])
    # the int8 + scanned run's delta starts an fp32 unscanned run (same base identity)
    again = _run(tiny_config(model, task, str(root / "from_int8"), "lora,bitfit", **{
        "train.init_from": str(root / "int8" / "delta")}))
    assert np.isfinite(again.row["metrics"]["accuracy"])


@pytest.mark.parametrize("over,key", [
    ({"model.quantize": "int4"}, "config.model.quantize"),
    ({"model.param_dtype": "float16"}, "config.model.param_dtype"),
    ({"model.quantize": "int8", "peft.methods": "full"}, "config.model.quantize"),
    ({"model.scan_layers": True, "peft.lora.targets": "encoder/layer_0/.*"}, "config.peft.lora.targets"),
])
def test_storage_config_errors_name_the_key(tiny, over, key):
    from peft_jax.experiment import build_experiment

    model, task, root = tiny
    cfg = tiny_config(model, task, str(root / "bad"), over.pop("peft.methods", "lora"), **over)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_experiment(cfg, pretrained=object())  # fails before anything loads
