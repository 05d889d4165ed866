"""Streaming sharded load == the in-memory load, laid out by the rules table: every family,
fp32 / bf16 storage, int8 kernels, scanned (stacked) layers, GGUF; two ``jax.distributed``
processes read disjoint row ranges and build the same global arrays."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from peft_jax.models import quantize, stack, streaming
from peft_jax.models.bert import BERT, BertConfig
from peft_jax.models.family import base_fingerprint
from peft_jax.models.gguf import open_gguf
from peft_jax.models.hf_io import CheckpointError, save_safetensors
from peft_jax.models.llama import LLAMA, LlamaConfig
from peft_jax.models.t5 import T5, T5Config
from peft_jax.parallel.mesh import logical_axes_tree, make_mesh, spec_for

HERE = os.path.dirname(os.path.abspath(__file__))
BF16 = np.dtype(ml_dtypes.bfloat16)
CASES = {
    "llama": (LLAMA, LlamaConfig.tiny(num_layers=3, tie_word_embeddings=False)),
    "bert": (BERT, BertConfig.tiny(num_layers=2, with_mlm_head=True)),
    "t5": (T5, T5Config.tiny(num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, scale_decoder_outputs=False)),
}


def _save(fam, config, folder, dtype=np.float32, seed=0):
    dummy = {"input_ids": np.zeros((1, 2), np.int32), "attention_mask": np.ones((1, 2), np.int32)}
    base = nn.meta.unbox(fam.build(config).init(jax.random.PRNGKey(seed),
                                                **fam.init_inputs(dummy))["params"])
    rng = np.random.default_rng(seed)
    base = jax.tree.map(lambda a: (np.asarray(a) + rng.normal(0, 0.1, a.shape)).astype(dtype), base)
    fam.save(folder, config, base, max_shard_bytes=4000)
    return fam.open(folder)


def _check(base, want, mesh, fam, config, quant="none"):
    """Same values, and each leaf laid out as the rules table says."""
    flat_got = jax.tree_util.tree_flatten_with_path(base)[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    axes = logical_axes_tree(streaming.abstract_base(fam, config, quant))
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_got) == len(flat_want)
    sharded = 0
    for path, arr in flat_got:
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat_want[path]), err_msg=str(path))
        assert arr.dtype == np.asarray(flat_want[path]).dtype, path
        spec = spec_for(flat_axes[path], arr.shape, mesh)
        assert arr.sharding.spec == spec, (path, arr.sharding.spec, spec)
        sharded += any(s is not None for s in spec)
    assert sharded > 0


@pytest.mark.parametrize("family", sorted(CASES))
def test_streaming_load_equals_in_memory(family, tmp_path):
    fam, config = CASES[family]
    config, src = _save(fam, config, str(tmp_path))
    assert len(set(src.file_of(n) for n in src.names())) >= 3  # sharded files
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    want = fam.params_from_hf(src, config)
    _check(streaming.load_sharded(fam, config, src, mesh), want, mesh, fam, config)
    scanned = dataclasses.replace(config, scan_layers=True)
    _check(streaming.load_sharded(fam, scanned, src, mesh), stack.stack_layers(want), mesh, fam,
           scanned)


def test_bf16_storage_and_int8_kernels(tmp_path):
    fam, config = CASES["llama"]
    config, src = _save(fam, config, str(tmp_path), dtype=BF16)
    mesh = make_mesh({"fsdp": 8})
    want = fam.params_from_hf(src, config)                                  # float32
    got = streaming.load_sharded(fam, config, src, mesh)                     # checkpoint dtype
    assert {a.dtype for a in jax.tree.leaves(got)} == {BF16}
    _check(got, quantize.cast(want, BF16), mesh, fam, config)
    f32 = streaming.load_sharded(fam, config, src, mesh, param_dtype=np.float32)
    _check(f32, want, mesh, fam, config)
    q = streaming.load_sharded(fam, config, src, mesh, quant="int8")
    _check(q, quantize.cast(quantize.quantize(want), BF16), mesh, fam, config, quant="int8")
    bytes_ = lambda t: sum(a.nbytes for a in jax.tree.leaves(t))
    assert bytes_(got) == bytes_(f32) // 2 and bytes_(q) < bytes_(got)
    scanned = dataclasses.replace(config, scan_layers=True)
    qs = streaming.load_sharded(fam, scanned, src, mesh, quant="int8", param_dtype=np.float32)
    _check(qs, stack.stack_layers(quantize.quantize(want)), mesh, fam, scanned, quant="int8")
    # groups of 8 input rows (the tiny kernels are narrower than the default 64: one group)
    qg = streaming.load_sharded(fam, config, src, mesh, quant="int8", quant_group=8)
    _check(qg, quantize.cast(quantize.quantize(want, 8), BF16), mesh, fam, config, quant="int8")
    scales = [a for p, a in jax.tree_util.tree_flatten_with_path(qg)[0] if "kernel_scale" in str(p)]
    assert scales and all(s.shape[-2] > 1 for s in scales)


def test_gguf_source_streams(tmp_path):
    sys.path.insert(0, HERE)
    from test_gguf import write_tiny_gguf

    config = LlamaConfig.tiny(pad_token_id=None, bos_token_id=None, eos_token_id=None,
                              rms_norm_eps=2.0 ** -20)
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.1, a.shape).astype(np.float32),
                        nn.meta.unbox(LLAMA.build(config).init(jax.random.PRNGKey(0),
                                                               np.ones((1, 3), np.int32))["params"]))
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, config, LLAMA.params_to_hf(base, config))
    got_config, src = open_gguf(path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    _check(streaming.load_sharded(LLAMA, got_config, src, mesh), base, mesh, LLAMA, got_config)
    assert streaming.source_fingerprint(LLAMA, got_config, src) == base_fingerprint(base)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_source_fingerprint_is_the_in_memory_hash(dtype, tmp_path):
    """Sampled from the checkpoint rows alone == base_fingerprint of the fp32 in-memory load."""
    for family, (fam, config) in CASES.items():
        config, src = _save(fam, config, str(tmp_path / family), dtype=dtype)
        assert streaming.source_fingerprint(fam, config, src) == base_fingerprint(
            fam.params_from_hf(src, config)), family


def test_read_rows_equals_row_slices(tmp_path):
    """``read_rows`` (one open file for all rows) == one ``read`` slice per row, any order,
    repeats included; a row out of range is refused."""
    fam, config = CASES["llama"]
    config, src = _save(fam, config, str(tmp_path))
    for name in src.names():
        shape, _ = src.info(name)
        rows = np.array([shape[0] - 1, 0, shape[0] // 2, 0])
        want = np.stack([src.read(name, slice(int(r), int(r) + 1))[0] for r in rows])
        np.testing.assert_array_equal(src.read_rows(name, rows), want)
    with pytest.raises(IndexError):
        src.read_rows(name, [shape[0]])


def test_stray_tensor_refused_before_loading(tmp_path):
    fam, config = CASES["llama"]
    config, src = _save(fam, config, str(tmp_path))
    tensors = {n: src.read(n) for n in src.names()}
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)
    save_safetensors(str(tmp_path / "x"), tensors, config.to_hf())
    _, src2 = fam.open(str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'model\.layers\.0\.mlp\.extra\.weight'"):
        streaming.load_sharded(fam, config, src2, make_mesh({"fsdp": 8}))


@pytest.mark.slow
def test_two_processes_read_their_rows(tmp_path):
    """2 jax.distributed processes x 4 devices: each builds its shards of the global base
    from the rows it reads; gathered, they equal the in-memory load."""
    fam, config = CASES["llama"]
    config, src = _save(fam, config, str(tmp_path / "ckpt"), dtype=BF16)
    want = jax.tree.map(np.asarray, quantize.cast(fam.params_from_hf(src, config), BF16))
    np.savez(tmp_path / "want.npz", *[np.asarray(a, np.float32) for a in jax.tree.leaves(want)])
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import os, sys, numpy as np
pid = int(sys.argv[1])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
from peft_jax.parallel import distributed
distributed.initialize("127.0.0.1:{12900 + os.getpid() % 500}", 2, pid)
import jax
from jax.experimental import multihost_utils
from peft_jax.models import streaming
from peft_jax.models.llama import LLAMA
from peft_jax.parallel.mesh import make_mesh
config, src = LLAMA.open({str(tmp_path / "ckpt")!r})
base = streaming.load_sharded(LLAMA, config, src, make_mesh({{"fsdp": 4, "tensor": 2}}))
local = sum(s.data.nbytes for a in jax.tree.leaves(base) for s in a.addressable_shards)
full = [np.asarray(multihost_utils.process_allgather(a, tiled=True), np.float32) for a in jax.tree.leaves(base)]
if pid == 0:
    np.savez({str(tmp_path / "got.npz")!r}, *full)
print("local_bytes", local, sum(a.nbytes for a in jax.tree.leaves(base)))
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got, ref = np.load(tmp_path / "got.npz"), np.load(tmp_path / "want.npz")
    for k in ref.files:
        np.testing.assert_array_equal(got[k], ref[k])
    for log in logs:  # each process holds only its devices' shards (half of the sharded leaves)
        local, total = (int(x) for x in log.split("local_bytes")[1].split()[:2])
        assert local < total
