"""Delta checkpoints: bit-exact round trip, metadata validation, corruption, atomicity."""

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from peft_jax.models.hf_io import CheckpointError
from peft_jax.peft import delta_io as D


@dataclasses.dataclass(frozen=True)
class PromptCfg:  # stands for any method dataclass: delta_io only reads its fields
    length: int = 20
    init: str = "vocab"


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    rank: int = 4
    alpha: float = 8.0
    targets: str = r".*/(query|value)$"
    layers: tuple = (0, 1)


def make_delta(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "prompt": rng.normal(size=(20, 16)).astype(np.float32),
        "encoder": {"layer_0": {"attention": {"query": {
            "lora_a": rng.normal(size=(16, 4)).astype(np.float32),
            "lora_b": rng.normal(size=(4, 16)).astype(ml_dtypes.bfloat16)}}}},
        "head": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
                 "bias": np.zeros((3,), np.float16),
                 "count": np.arange(5, dtype=np.int32)},
    }


def make_base(seed=1):
    rng = np.random.default_rng(seed)
    return {"embeddings": {"word": rng.normal(size=(300, 16)).astype(np.float32)},
            "layer_0": {"kernel": rng.normal(size=(16, 16)).astype(np.float32),
                        "bias": np.zeros(16, np.float32)}}


METHODS = (PromptCfg(), LoraCfg())


@pytest.fixture
def saved(tmp_path):
    delta, base = make_delta(), make_base()
    folder = str(tmp_path / "delta")
    D.save_delta(folder, delta, base_id="tiny-bert", base_hash=D.base_fingerprint(base),
                 methods=METHODS, extra={"task": "sst2", "step": 7})
    return folder, delta, base


def test_round_trip_bit_exact(saved):
    folder, delta, base = saved
    loaded, meta = D.load_delta(folder, base_id="tiny-bert", base_hash=D.base_fingerprint(base),
                                methods=METHODS)
    want, got = D.flatten_delta(delta), D.flatten_delta(loaded)
    assert sorted(want) == sorted(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k
    assert meta["extra"] == {"task": "sst2", "step": 7}
    assert meta["methods"][1] == {"type": f"{LoraCfg.__module__}.LoraCfg", "fields": {
        "rank": 4, "alpha": 8.0, "targets": r".*/(query|value)$", "layers": [0, 1]}}
    assert meta["peft_jax_version"] and meta["base_id"] == "tiny-bert"
    assert sorted(os.listdir(folder)) == ["delta.json", "delta.safetensors"]


def test_base_fingerprint_properties():
    base = make_base()
    h = D.base_fingerprint(base)
    assert h.startswith("sha256:") and h == D.base_fingerprint(make_base())
    # numpy and device arrays of the same values hash alike
    assert D.base_fingerprint({k: {n: jnp.asarray(a) for n, a in v.items()}
                               for k, v in base.items()}) == h
    # another base (weights changed everywhere, as fine-tuning or another checkpoint does)
    assert D.base_fingerprint(make_base(seed=2)) != h
    # a single sampled element: the first one of every leaf is always sampled
    b2 = make_base()
    b2["layer_0"]["kernel"][0, 0] += 1e-3
    assert D.base_fingerprint(b2) != h
    # architecture / dtype changes
    b3 = make_base()
    b3["layer_0"]["bias"] = np.zeros(17, np.float32)
    assert D.base_fingerprint(b3) != h
    b4 = make_base()
    b4["layer_0"]["bias"] = b4["layer_0"]["bias"].astype(ml_dtypes.bfloat16)
    assert D.base_fingerprint(b4) != h


def test_other_base_is_a_clear_error(saved):
    folder, _, base = saved
    other = D.base_fingerprint(make_base(seed=5))
    with pytest.raises(D.DeltaMismatch) as e:
        D.load_delta(folder, base_hash=other)
    msg = str(e.value)
    assert "'base_hash'" in msg and D.base_fingerprint(base) in msg and other in msg
    with pytest.raises(D.DeltaMismatch, match=r"'base_id' is 'tiny-bert' in the delta but 'llama'"):
        D.load_delta(folder, base_id="llama")


def test_other_method_config_is_a_clear_error(saved):
    folder, _, _ = saved
    with pytest.raises(D.DeltaMismatch,
                       match=r"method 0 \(PromptCfg\) field 'length' is 20 in the delta but 100"):
        D.load_delta(folder, methods=(PromptCfg(length=100), LoraCfg()))
    with pytest.raises(D.DeltaMismatch, match=r"field 'layers' is \[0, 1\] in the delta but \[0\]"):
        D.load_delta(folder, methods=(PromptCfg(), LoraCfg(layers=(0,))))
    with pytest.raises(D.DeltaMismatch, match=r"2 method\(s\) \['PromptCfg', 'LoraCfg'\].*1"):
        D.load_delta(folder, methods=(PromptCfg(),))
    with pytest.raises(D.DeltaMismatch, match=r"method 0 is .*PromptCfg in the delta but .*LoraCfg"):
        D.load_delta(folder, methods=(LoraCfg(), PromptCfg()))


def test_corrupted_tensor_file(saved):
    folder, _, _ = saved
    path = os.path.join(folder, "delta.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0x40  # flip one bit of the last tensor's data
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"delta.safetensors: content hash .* corrupted"):
        D.load_delta(folder)


def test_truncated_tensor_file_and_bad_metadata(saved, tmp_path):
    folder, _, _ = saved
    path = os.path.join(folder, "delta.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        D.load_delta(folder)
    # even with a matching recorded hash, the header check names the file and the tensor
    meta = json.load(open(os.path.join(folder, "delta.json")))
    meta["tensors_sha256"] = D._file_sha256(path)
    json.dump(meta, open(os.path.join(folder, "delta.json"), "w"))
    with pytest.raises(CheckpointError, match=r"delta.safetensors: tensor '.*' ends at byte \d+ "
                                              r"of the data but the file holds \d+ \(truncated"):
        D.load_delta(folder)
    open(os.path.join(folder, "delta.json"), "w").write('{"format": "peft_jax.delta", ')
    with pytest.raises(CheckpointError, match=r"delta.json: invalid JSON"):
        D.load_delta(folder)
    with pytest.raises(CheckpointError, match="no such delta folder"):
        D.load_delta(str(tmp_path / "nope"))


def test_atomic_overwrite_and_failed_write(saved, monkeypatch):
    folder, delta, base = saved
    parent = os.path.dirname(folder)
    new = make_delta(seed=9)
    D.save_delta(folder, new, base_id="tiny-bert", base_hash="h2", methods=METHODS)
    loaded, meta = D.load_delta(folder)
    assert meta["base_hash"] == "h2"
    np.testing.assert_array_equal(loaded["prompt"], new["prompt"])

    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        D.save_delta(folder, delta, base_id="x", base_hash="h3")
    loaded, meta = D.load_delta(folder)  # the previous delta is intact
    assert meta["base_hash"] == "h2"
    assert sorted(os.listdir(parent)) == ["delta"]  # no temp folders left behind


def test_refuses_to_replace_unrelated_folder(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        D.save_delta(str(other), make_delta(), base_id="b", base_hash="h")
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):
        D.save_delta(str(other), make_delta(), base_id="b", base_hash="h", overwrite=False)


def test_export_prompt_npy(tmp_path):
    delta = make_delta()
    delta["encoder"]["prompt"] = np.ones((5, 16), np.float32)
    paths = D.export_prompt_npy(delta, str(tmp_path / "prompts"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["encoder.prompt.npy", "prompt.npy"]
    assert sorted(os.listdir(tmp_path / "prompts")) == names  # no temp files
    got = D.load_prompt_npy(str(tmp_path / "prompts" / "prompt.npy"))
    assert got.tobytes() == delta["prompt"].tobytes()
    with pytest.raises(ValueError, match="no 'prompt' leaf"):
        D.export_prompt_npy({"head": {"kernel": np.zeros((2, 2))}}, str(tmp_path / "x"))
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"bad.npy: a prompt must be \[length, d_model\]"):
        D.load_prompt_npy(str(tmp_path / "bad.npy"))


def test_real_method_configs_round_trip_and_mismatch(tmp_path):
    """The project's method dataclasses serialize, and a prompt length change is named."""
    from peft_jax.models.slots import Slots
    from peft_jax.peft import LoRA, PromptTuning

    slots = Slots((PromptTuning(length=20), LoRA(rank=4, rank_pattern={"value": 2})))
    folder = str(tmp_path / "d")
    D.save_delta(folder, {"prompt": np.zeros((20, 8), np.float32)}, base_id="b", base_hash="h",
                 methods=slots)
    _, meta = D.load_delta(folder, methods=slots)
    assert meta["methods"][1]["fields"]["rank_pattern"] == [["value", 2]]
    with pytest.raises(D.DeltaMismatch, match=r"method 0 \(PromptTuning\) field 'length' is 20 "
                                              r"in the delta but 100 in this run"):
        D.load_delta(folder, methods=Slots((PromptTuning(length=100), LoRA(rank=4,
                                                                    rank_pattern={"value": 2}))))
