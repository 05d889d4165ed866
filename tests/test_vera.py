"""VeRA: parity with HF PEFT 0.21 ``VeraConfig`` on tiny random BERT and Llama, and its shared
projections as method-owned frozen state.

Forward parity both ways (our export, with the projections, loads with ``PeftModel``; an
adapter saved by HF PEFT imports), merge, the projections' init from the recorded seed, and
a run of the runner: the projections sit in ``frozen["peft"]`` (no gradient, no optimizer
state), stay bit-identical while the lambdas train, are regenerated on restore, and the
runner's ``delta/`` holds them and reloads to the same outputs.
"""

import json
import math
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config, write_task, write_tiny_bert  # noqa: E402
from test_hf_peft_io import _assert_bit_exact, _peft_from, fam_bert, fam_llama  # noqa: E402,F401

from peft_jax.models.layers import Dense  # noqa: E402
from peft_jax.models.slots import Slots  # noqa: E402
from peft_jax.peft import hf_peft as H, merge, tree, unmerge  # noqa: E402
from peft_jax.peft.partition import split_trainable, tree_size  # noqa: E402
from peft_jax.train.builder import build_train_state  # noqa: E402
from peft_jax.train.step import make_train_step  # noqa: E402
from peft_jax.peft.vera import VeRA  # noqa: E402

TOL = 1e-5
# up / down make the layers' widths differ (32 and 37 in BERT; 32, 16 and 40 in Llama), so
# every layer reads its own slice of the shared projections
TARGETS = {"bert": r".*/(query|value|up|down)$", "llama": r".*/(query|value|down)$"}


def _randomize(delta, seed):
    """Random non-zero lambdas; the shared projections are kept."""
    rng = np.random.default_rng(seed)
    return tree.unflatten({p: x if p.startswith("vera_shared/") else
                           (0.5 * rng.normal(size=np.shape(x))).astype(np.float32)
                           for p, x in tree.flatten(delta).items()})


def _hf_names(f, regex):
    return [f.names(p) for p in H.module_paths(f.base) if re.fullmatch(regex, p)]


def _ours(f, vera, delta):
    return f.ours([vera], vera.materialize(delta))


# ----------------------------------------------------------------------------- init


def test_projections_from_the_seed_sliced_per_layer_one_copy(fam_bert):
    f = fam_bert
    vera = VeRA(targets=TARGETS["bert"], rank=6, d_initial=0.25, projection_prng_key=3)
    delta = f.init([vera])
    a, b = delta["vera_shared"]["vera_a"], delta["vera_shared"]["vera_b"]
    assert a.shape == (37, 6) and b.shape == (6, 37)        # largest in / out of the targets
    assert 0.9 * math.sqrt(6 / 37) < np.max(np.abs(a)) <= math.sqrt(6 / 37)   # kaiming uniform
    assert 0.9 * math.sqrt(6 / 6) < np.max(np.abs(b)) <= math.sqrt(6 / 6)
    # the same seed -> the same projections, whatever the init rng; another seed differs
    again = f.init([vera], seed=9)["vera_shared"]
    assert np.array_equal(again["vera_a"], a) and np.array_equal(again["vera_b"], b)
    other = f.init([VeRA(targets=TARGETS["bert"], rank=6, projection_prng_key=4)])
    assert not np.allclose(other["vera_shared"]["vera_a"], a)
    # HF's init of the lambdas: d_initial and zeros (a fresh delta is the identity)
    for p, x in tree.leaves_named(delta, "vera_lambda_d").items():
        assert np.all(np.asarray(x) == np.float32(0.25)), p
    assert all(not np.asarray(x).any() for x in tree.leaves_named(delta, "vera_lambda_b").values())
    assert np.max(np.abs(_ours(f, vera, delta) - f.ours([], {}))) <= 1e-6
    # materialize hands every module a reference to the one copy
    mat = vera.materialize(delta)
    assert "vera_shared" not in mat
    mods = tree.modules_with(mat, "vera_lambda_d")
    assert len(mods) == 8 and all(m["vera_a"] is a and m["vera_b"] is b for _, m in mods)
    # the projections are method-owned frozen state: the partition puts them in the frozen tree
    trainable, frozen = split_trainable(f.base, delta, methods=[vera])
    assert sorted(tree.flatten(frozen["peft"])) == ["vera_shared/vera_a", "vera_shared/vera_b"]
    assert not any("vera_shared" in p for p in tree.flatten(trainable))
    assert tree_size(trainable["peft"]) == 8 * 6 + 2 * (32 + 32 + 37 + 32)


def test_without_projections_the_slot_says_what_to_do(fam_bert):
    f = fam_bert
    vera = VeRA(targets=TARGETS["bert"], rank=4)
    delta = f.init([vera])
    with pytest.raises(ValueError, match="VeRA.materialize"):
        f.ours([vera], delta)


def test_dropout_acts_on_the_vera_input_only():
    """Training with ``vera_dropout``: ``y - base(x) = d(x) @ (a diag(lambda_d) b
    diag(lambda_b))`` (full rank with r = in = out); solving for ``d(x)`` gives, in every
    entry, either 0 or ``x / (1 - p)``, both present."""
    n, p = 8, 0.5
    vera = VeRA(targets=".*", rank=n, dropout=p)
    layer = Dense(n, slots=Slots((vera,)))
    x = jax.random.normal(jax.random.key(0), (16, n))
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(n, n)).astype(np.float32),
              "bias": rng.normal(size=(n,)).astype(np.float32)}
    pe = {"vera_lambda_d": rng.uniform(0.5, 2, size=(n,)).astype(np.float32),
          "vera_lambda_b": rng.uniform(0.5, 2, size=(n,)).astype(np.float32),
          "vera_shared": vera.projections(n, n)}
    assert set(layer.init(jax.random.key(1), x)["peft"]) == {"vera_lambda_d", "vera_lambda_b"}
    y = layer.apply({"params": params, "peft": vera.materialize(pe)}, x, deterministic=False,
                    rngs={"dropout": jax.random.key(2)})
    a, b = np.asarray(pe["vera_shared"]["vera_a"]), np.asarray(pe["vera_shared"]["vera_b"])
    m = (a * pe["vera_lambda_d"]) @ (b * pe["vera_lambda_b"])
    dx = (np.asarray(y, np.float64) - (np.asarray(x) @ params["kernel"] + params["bias"])) \
        @ np.linalg.inv(m)
    kept = np.isclose(dx, np.asarray(x) / (1 - p), atol=1e-3)
    dropped = np.isclose(dx, 0.0, atol=1e-3)
    assert (kept | dropped).all() and kept.any() and dropped.any()


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_vera_exported_by_us_loads_in_hf_peft(family, request, tmp_path):
    f = request.getfixturevalue(f"fam_{family}")
    vera = VeRA(targets=TARGETS[family], rank=4, projection_prng_key=5)
    delta = _randomize(f.init([vera]), 7)
    folder = H.export_method(str(tmp_path / "a"), delta, vera, hf_module_name=f.names)
    cfg, tensors = H.read_adapter(folder)
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True and cfg["r"] == 4
    assert np.array_equal(tensors["base_model.vera_A"], delta["vera_shared"]["vera_a"].T)
    pm = _peft_from(f.hf_model(), folder)
    theirs, ours = f.theirs(pm), _ours(f, vera, delta)
    assert np.max(np.abs(theirs - f.theirs(f.hf_model()))) > 1e-2   # the adapter acts
    assert f.compare(ours, theirs) <= TOL


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_vera_saved_by_hf_peft_imports(family, request, tmp_path):
    f = request.getfixturevalue(f"fam_{family}")
    cfg = peft.VeraConfig(r=4, target_modules=_hf_names(f, TARGETS[family]), init_weights=False,
                          projection_prng_key=11, d_initial=0.2, vera_dropout=0.1)
    torch.manual_seed(0)
    pm = peft.get_peft_model(f.hf_model(), cfg).eval()
    pm.save_pretrained(str(tmp_path / "a"))
    delta, info = H.import_hf_peft(str(tmp_path / "a"), base=f.base,
                                   hf_module_name=f.names)
    vera = info["method"]
    assert isinstance(vera, VeRA) and info["kind"] == "vera"
    assert (vera.rank, vera.projection_prng_key, vera.d_initial, vera.dropout) == (4, 11, 0.2, 0.1)
    # HF's torch-drawn projections are kept (ours would differ: JAX's PRNG)
    hf_a = pm.base_model.vera_A["default"].numpy()
    assert np.array_equal(delta["vera_shared"]["vera_a"], hf_a.T)
    ours_a = vera.projections(hf_a.shape[1], pm.base_model.vera_B["default"].shape[0])["vera_a"]
    assert ours_a.shape == hf_a.T.shape and not np.allclose(ours_a, hf_a.T)
    assert f.compare(_ours(f, vera, delta), f.theirs(pm)) <= TOL
    # and back: our export of the import re-imports bit-identically
    H.export_method(str(tmp_path / "b"), delta, vera, hf_module_name=f.names)
    again, info2 = H.import_hf_peft(str(tmp_path / "b"), base=f.base,
                                    hf_module_name=f.names)
    _assert_bit_exact(delta, again)
    assert info2["method"] == vera


def test_adapter_without_projections_is_refused(fam_bert, tmp_path):
    f = fam_bert
    cfg = peft.VeraConfig(r=4, target_modules=["query"], save_projection=False)
    pm = peft.get_peft_model(f.hf_model(), cfg)
    pm.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(H.CheckpointError, match="save_projection=False.*Re-save it with "
                                                "save_projection=True"):
        H.import_hf_peft(str(tmp_path / "a"), base=f.base, hf_module_name=f.names)


# ----------------------------------------------------------------------------- merge


def test_merged_equals_unmerged_and_hf_merged_weights(fam_bert, tmp_path):
    f = fam_bert
    vera = VeRA(targets=TARGETS["bert"], rank=4)
    delta = _randomize(f.init([vera]), 3)
    merged = merge(f.base, delta, [vera])
    out = f.model_cls(f.config).apply({"params": merged}, jnp.asarray(f.ids), jnp.asarray(f.mask))
    err = f.compare(np.asarray(out["hidden_states"]), _ours(f, vera, delta))
    print(f"VeRA merged vs unmerged: max abs err {err:.2e}")
    assert err <= TOL
    back = unmerge(merged, delta, [vera])
    for (p, x), (_, y) in zip(tree.flatten(back).items(), tree.flatten(f.base).items()):
        assert np.max(np.abs(np.asarray(x) - y)) <= 1e-6, p
    folder = H.export_method(str(tmp_path / "a"), delta, vera, hf_module_name=f.names)
    hf_merged = _peft_from(f.hf_model(), folder).merge_and_unload().state_dict()
    for p, _ in tree.modules_with(delta, "vera_lambda_d"):
        k = np.asarray(tree.get(merged, p + "/kernel"))
        assert np.max(np.abs(k - hf_merged[f.names(p) + ".weight"].numpy().T)) <= 1e-6
        assert np.max(np.abs(k - tree.get(f.base, p + "/kernel"))) > 1e-3


# ----------------------------------------------------------------------------- training


def test_train_steps_leave_the_projections_bit_identical_and_train_the_lambdas(fam_bert):
    """The one train-state builder: projections in ``frozen["peft"]``, no optimizer state for
    them; after three jitted steps (VeRA dropout on) they are bit-identical while every
    lambda moved."""
    f = fam_bert
    vera = VeRA(targets=TARGETS["bert"], rank=4, dropout=0.1)
    model = f.model_cls(f.config, slots=Slots((vera,)))
    batch = {"input_ids": jnp.asarray(f.ids), "attention_mask": jnp.asarray(f.mask)}
    ts = build_train_state(model, f.base, [vera], batch, jax.random.key(0),
                           lambda tr: optax.adam(1e-2))
    before = jax.device_get(ts.frozen["peft"])
    assert sorted(tree.flatten(before)) == ["vera_shared/vera_a", "vera_shared/vera_b"]
    assert not any("vera_shared" in p for p in tree.flatten(ts.state.trainable))
    opt = [x for x in jax.tree.leaves(ts.state.opt_state) if np.ndim(x) > 0]
    assert sum(int(np.size(x)) for x in opt) == 2 * tree_size(ts.state.trainable)  # Adam mu, nu
    target = jax.random.normal(jax.random.key(1), (2, f.ids.shape[1], f.config.d_model))

    def loss_fn(variables, b, rng, deterministic):
        h = model.apply(variables, **b, deterministic=deterministic,
                        rngs={"dropout": rng})["hidden_states"]
        return jnp.mean(jnp.square(h - target)), {}

    step = jax.jit(make_train_step(loss_fn, ts.variables, ts.tx))
    state = ts.state
    for _ in range(3):
        state, metrics = step(state, ts.frozen, batch)
        assert float(metrics["finite"]) == 1.0
    after = jax.device_get(ts.frozen["peft"])
    fresh = vera.projections(37, 37)
    for k in ("vera_a", "vera_b"):
        assert np.asarray(after["vera_shared"][k]).tobytes() == before["vera_shared"][k].tobytes()
        assert np.asarray(fresh[k]).tobytes() == before["vera_shared"][k].tobytes()
    old, new = tree.flatten(ts.state.trainable), tree.flatten(jax.device_get(state.trainable))
    assert sorted(old) == sorted(new) and len(new) == 16
    assert all(np.max(np.abs(np.asarray(new[p]) - np.asarray(old[p]))) > 1e-4 for p in new)


# ----------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def vera_run(tmp_path_factory, minilm_path):
    from peft_jax.experiment import run_experiment
    root = tmp_path_factory.mktemp("vera_run")
    model = write_tiny_bert(str(root / "model"), minilm_path)
    task = write_task(str(root / "data"))
    cfg = tiny_config(model, task, str(root / "wd"), "vera",
                      **{"peft.vera.rank": 8, "peft.vera.dropout": 0.1})
    return cfg, run_experiment(cfg)


@pytest.mark.slow
def test_runner_projections_frozen_lambdas_trained_delta_reloads(vera_run):
    from peft_jax.experiment import evaluate_experiment
    from peft_jax.peft.delta_io import load_delta
    from peft_jax.peft.report import param_report

    cfg, res = vera_run
    vera = res.session.exp.methods[0]
    assert isinstance(vera, VeRA) and res.row["status"] == "finished"
    frozen = jax.device_get(res.frozen["peft"])
    trainable = jax.device_get(res.state.trainable)
    # projections: frozen tree only, no optimizer state, equal to the seed's after training
    assert sorted(tree.flatten(frozen)) == ["vera_shared/vera_a", "vera_shared/vera_b"]
    assert not any("vera_shared" in p for p in tree.flatten(trainable))
    opt = [x for x in jax.tree.leaves(res.state.opt_state) if np.ndim(x) > 0]
    assert sum(int(np.size(x)) for x in opt) == 2 * tree_size(trainable)   # AdamW mu, nu
    fresh = vera.projections(32, 32)
    for k in ("vera_a", "vera_b"):
        assert np.asarray(frozen["vera_shared"][k]).tobytes() == np.asarray(fresh[k]).tobytes()
    # the lambdas trained away from their init
    lam = tree.flatten(trainable["peft"])
    assert all(np.asarray(x).any() for p, x in lam.items() if p.endswith("vera_lambda_b"))
    assert all(np.max(np.abs(np.asarray(x) - 0.1)) > 1e-4
               for p, x in lam.items() if p.endswith("vera_lambda_d"))
    # the report counts the projections as frozen
    rep = param_report(res.session.exp.pre.base, tree.merge(trainable["peft"], frozen),
                       methods=res.session.exp.methods)
    rows = {r.group: r.trainable for r in rep.by_method}
    assert rows["vera"] == 4 * (8 + 32) and rep.trainable == tree_size(trainable)
    # delta/ holds the projections and reloads to the same outputs
    saved, _ = load_delta(os.path.join(cfg.workdir, "delta"))
    for k in ("vera_a", "vera_b"):
        assert np.array_equal(saved["peft"]["vera_shared"][k], frozen["vera_shared"][k])
    model, base = res.session.exp.model, res.session.exp.pre.base
    ids = jnp.asarray(np.random.default_rng(0).integers(100, 2000, size=(2, 12)), jnp.int32)
    batch = dict(input_ids=ids, attention_mask=jnp.ones_like(ids))
    ours = model.apply(res.session.ts.variables(res.frozen, res.selected), **batch)
    reloaded = {"params": base, "peft": vera.materialize(saved["peft"])}
    again = model.apply(reloaded, **batch)
    assert np.array_equal(np.asarray(ours["hidden_states"]), np.asarray(again["hidden_states"]))
    zeroed = {"params": base, "peft": vera.materialize(dict(saved["peft"], vera_shared={
        k: np.zeros_like(v) for k, v in saved["peft"]["vera_shared"].items()}))}
    assert not np.allclose(np.asarray(model.apply(zeroed, **batch)["hidden_states"]),
                           np.asarray(ours["hidden_states"]), atol=1e-4)
    # a restore (peft-jax eval) regenerates the projections and reproduces the final metrics
    assert evaluate_experiment(cfg) == pytest.approx(res.row["metrics"], abs=1e-6)
