"""The Family protocol: a new family is one file; every family has the same interface.

``ToyFamily`` below is a complete family written the way a new one would be: a config, a
Flax model from the shared layers, a layout, a module map, the call inputs. Registered, it
is loaded and saved by the shared machinery (``registry.load_pretrained`` /
``save_pretrained``), and a checkpoint with a stray tensor is refused from its header.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import resource

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import family as F
from peft_jax.models import hf_io, registry
from peft_jax.models.bert import BERT, BertConfig
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.layers import Dense, Embed, LayerNorm
from peft_jax.models.llama import LLAMA, LlamaConfig
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.t5 import T5, T5Config
from peft_jax.peft import LoRA, init_delta


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 50
    d_model: int = 8
    num_layers: int = 2

    @classmethod
    def from_hf(cls, cfg, source="config.json", **overrides):
        return cls(**{k: hf_io.config_field(cfg, k, int, source=source)
                      for k in ("vocab_size", "d_model", "num_layers")}, **overrides)

    def to_hf(self) -> dict:
        return {"model_type": "toy_mlp", **dataclasses.asdict(self)}


class ToyModel(nn.Module):
    config: ToyConfig
    slots: Slots = NO_SLOTS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, deterministic=True,
                 output_hidden_states=False):
        c = self.config
        x = Embed(c.vocab_size, c.d_model, name="embed")(input_ids)
        for i in range(c.num_layers):
            x = x + jnp.tanh(Dense(c.d_model, slots=self.slots, name=f"layer_{i}")(x, deterministic))
        h = LayerNorm(name="norm")(x)
        return {"hidden_states": h, "attention_mask": attention_mask}


class ToyFamily(F.Family):
    name = "toy"
    model_types = ("toy_mlp",)
    kind = "encoder"
    model_class = ToyModel
    config_class = ToyConfig
    module_map = ((r"embed", "embed"), (r"layer_(\d+)", r"blocks.\1.dense"), (r"norm", "norm"))

    def layout(self, c):
        out = [(("embed", "embedding"), "embed.weight", "table", (c.vocab_size, c.d_model))]
        for i in range(c.num_layers):
            out.append(((f"layer_{i}", "kernel"), f"blocks.{i}.dense.weight", "linear",
                        (c.d_model, c.d_model)))
            out.append(((f"layer_{i}", "bias"), f"blocks.{i}.dense.bias", "vector", (c.d_model,)))
        out += [(("norm", "scale"), "norm.weight", "vector", (c.d_model,)),
                (("norm", "bias"), "norm.bias", "vector", (c.d_model,))]
        return out

    def inputs(self, batch, config):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture
def toy():
    fam = F.register(ToyFamily())
    yield fam
    F.unregister(fam)


def _random_base(fam, config, seed=0):
    base = nn.meta.unbox(fam.build(config).init(jax.random.PRNGKey(seed),
                                                **fam.init_inputs(_batch()))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.1, a.shape).astype(np.float32), base)


def _batch(b=2, length=5):
    ids = np.arange(b * length, dtype=np.int32).reshape(b, length) % 50
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_a_new_family_loads_and_saves_through_the_shared_machinery(toy, tmp_path):
    config = ToyConfig()
    base = _random_base(toy, config)
    folder = str(tmp_path / "toy")
    toy.save(folder, config, base)
    saved = hf_io.SafetensorsFolder(folder)
    # HF layout on disk: linear weights [out, in] = our kernel transposed
    np.testing.assert_array_equal(saved.read("blocks.1.dense.weight"), base["layer_1"]["kernel"].T)

    pre = registry.load_pretrained(folder, with_tokenizer=False)
    assert pre.family is toy and pre.kind == "encoder" and pre.config == config
    jax.tree.map(np.testing.assert_array_equal, pre.base, base)

    # the uniform call, from the model object alone
    model = pre.build(Slots((LoRA(targets=r"layer_\d+", rank=2),)))
    assert F.for_model(model) is toy
    delta = init_delta(model, pre.base, toy.init_inputs(_batch()), jax.random.PRNGKey(1))
    out = F.for_model(model).apply(model, {"params": pre.base, "peft": delta}, _batch())
    ref = pre.build().apply({"params": base}, **_batch())
    np.testing.assert_allclose(out["hidden_states"], ref["hidden_states"], atol=1e-6)  # B = 0
    assert pre.hf_module_name("layer_1") == "blocks.1.dense"

    # save_pretrained -> load again: the same tensors
    again = str(tmp_path / "again")
    registry.save_pretrained(pre, again)
    pre2 = registry.load_pretrained(again, with_tokenizer=False)
    jax.tree.map(np.testing.assert_array_equal, pre2.base, base)


def test_unregistered_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy_mlp"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='toy_mlp' is not supported"):
        registry.load_pretrained(str(tmp_path), with_tokenizer=False)


def test_registering_a_taken_model_type_is_refused(toy):
    class Other(ToyFamily):
        name = "other"

    with pytest.raises(ValueError, match="already registered by family 'toy'"):
        F.register(Other())


def test_hf_module_name_has_one_signature_for_every_family():
    sigs = {name: inspect.signature(type(F.for_model_type(t)).hf_module_name)
            for name, t in (("bert", "bert"), ("llama", "llama"), ("t5", "t5"))}
    assert len({str(s) for s in sigs.values()}) == 1, sigs
    cases = [
        (BERT, BertConfig.tiny(), "encoder/layer_1/attention/query", "encoder.layer.1.attention.self.query"),
        (BERT, BertConfig.tiny(model_type="roberta", with_mlm_head=True), "mlm_head/transform",
         "lm_head.dense"),
        (LLAMA, LlamaConfig.tiny(), "decoder/layer_1/mlp/gate", "model.layers.1.mlp.gate_proj"),
        (T5, T5Config.tiny(feed_forward_proj="gated-gelu"), "decoder/layer_1/mlp/up",
         "decoder.block.1.layer.2.DenseReluDense.wi_1"),
        (T5, T5Config.tiny(), "encoder/layer_0/mlp/up", "encoder.block.0.layer.1.DenseReluDense.wi"),
    ]
    for fam, config, path, want in cases:
        assert fam.hf_module_name(path, config) == want


def test_one_kind_vocabulary_and_task_types():
    assert {F.for_model_type(t).kind for t in F.model_types()} <= set(F.KINDS)
    assert [F.for_model_type(t).hf_task_type("classification") for t in ("bert", "llama", "t5")] == [
        "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM"]


def test_sharded_save_round_trip_and_index(toy, tmp_path):
    config = ToyConfig(num_layers=4)
    base = _random_base(toy, config)
    files = toy.save(str(tmp_path), config, base, max_shard_bytes=600)
    assert len(files) >= 3 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    _, back = toy.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, back, base)
    # a partial row range reads only those rows
    src = hf_io.SafetensorsFolder(str(tmp_path))
    np.testing.assert_array_equal(src.read("embed.weight", slice(3, 7)), base["embed"]["embedding"][3:7])


def test_stray_tensor_is_refused_from_the_header_before_any_byte_is_read(toy, tmp_path):
    """Issue 13 item 8: a 3.2 GB tensor too many in model.safetensors (a sparse file) fails
    at once, without reading it, naming it and its size."""
    config = ToyConfig()
    folder = str(tmp_path)
    toy.save(folder, config, _random_base(toy, config))
    path = os.path.join(folder, "model.safetensors")
    header, start = hf_io.read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    n_extra = 800 * 2 ** 20  # float32 -> 3.2 GB
    header["extra.weight"] = {"dtype": "F32", "shape": [n_extra],
                              "data_offsets": [len(data), len(data) + 4 * n_extra]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)
        f.truncate(8 + len(blob) + len(data) + 4 * n_extra)  # sparse: 3.2 GB apparent size
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'extra\.weight' \(\[838860800\], "
                                              r"float32, 3,355,443,200 bytes\)"):
        toy.load(folder)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kb < 200 * 1024, grown_kb  # nothing of the 3.2 GB was read


def test_header_that_does_not_fit_the_file_is_refused(toy, tmp_path):
    config = ToyConfig()
    toy.save(str(tmp_path), config, _random_base(toy, config))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    with pytest.raises(CheckpointError, match=r"does not fit the file.*truncated or corrupted"):
        toy.load(str(tmp_path))
