"""SPoT: prompt library, similarity, ranking, bit-exact transfer init, retrieval evaluation."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.transfer import (LibraryError, PromptLibrary, add_from_run, evaluate_retrieval,
                               fit_length, gains_from_scores, mean_cosine, rank, token_cosine,
                               transfer_prompt)
from peft_jax.transfer.cli import rankings_for_targets, spot_main


def _awkward_prompt(rng, p, d, dtype=np.float32):
    """Random prompt with values that a lossy copy would change: -0.0, subnormals, large."""
    x = rng.standard_normal((p, d)).astype(dtype)
    x[0, 0] = -0.0
    x[0, 1] = np.finfo(dtype).tiny / 4  # subnormal
    x[-1, -1] = np.finfo(dtype).max / 3
    return x


class _PromptedEncoder(nn.Module):
    """Minimal stand-in for a model's input_embeddings slot: prepends a 'prompt' [P, d]."""
    length: int
    d: int

    @nn.compact
    def __call__(self, x):  # [b, l, d] -> [b, P + l, d]
        p = self.variable("peft", "prompt",
                          lambda: jax.random.uniform(self.make_rng("params"), (self.length, self.d)))
        return jnp.concatenate([jnp.broadcast_to(p.value, (x.shape[0],) + p.value.shape), x], axis=1)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _PromptedEncoder(5, 8, name="encoder")(x)
        return nn.Dense(3, name="head")(h)


def _init_delta():
    model = _Model()
    x = jnp.ones((2, 4, 8))
    variables = model.init({"params": jax.random.PRNGKey(0)}, x)
    return model, variables, x


def test_transfer_through_library_is_bit_exact_and_used_by_model(tmp_path):
    rng = np.random.default_rng(0)
    src = _awkward_prompt(rng, 5, 8)
    lib = PromptLibrary(str(tmp_path / "lib"), create=True)
    lib.add("sst2_src", src, task="sst2", base_id="tiny", base_hash="abc")
    loaded = lib.load("sst2_src")
    assert loaded.tobytes() == src.tobytes() and loaded.dtype == src.dtype

    model, variables, x = _init_delta()
    delta = variables["peft"]
    new = transfer_prompt(delta, loaded)
    leaf = new["encoder"]["prompt"]
    assert isinstance(leaf, jax.Array)
    assert np.asarray(leaf).tobytes() == src.tobytes()
    # the rest of the tree is untouched, and the input delta is not mutated
    assert np.asarray(delta["encoder"]["prompt"]).tobytes() != src.tobytes()
    out_h = _PromptedEncoder(5, 8).apply({"peft": new["encoder"]}, x)
    assert np.asarray(out_h[0, :5]).tobytes() == src.tobytes()
    y_new = model.apply({"params": variables["params"], "peft": new}, x)
    y_old = model.apply(variables, x)
    assert not np.allclose(np.asarray(y_new[:, :5]), np.asarray(y_old[:, :5]))
    np.testing.assert_array_equal(np.asarray(y_new[:, 5:]), np.asarray(y_old[:, 5:]))


def test_transfer_keeps_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    delta = {"prompt": jax.device_put(jnp.zeros((4, 6), jnp.float32), sh)}
    src = np.arange(24, dtype=np.float32).reshape(4, 6)
    new = transfer_prompt(delta, src)
    assert new["prompt"].sharding == sh
    assert np.asarray(new["prompt"]).tobytes() == src.tobytes()


def test_transfer_into_boxed_leaf_keeps_axis_names():
    box = nn.Partitioned(jnp.zeros((3, 4), jnp.float32), names=("prompt", "prompt_embed"))
    src = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    new = transfer_prompt({"encoder": {"prompt": box}}, src)["encoder"]["prompt"]
    assert isinstance(new, nn.Partitioned) and new.names == ("prompt", "prompt_embed")
    assert np.asarray(new.unbox()).tobytes() == src.tobytes()


def test_transfer_length_modes_and_errors():
    delta = {"encoder": {"prompt": np.zeros((5, 3), np.float32)}}
    src = np.arange(9, dtype=np.float32).reshape(3, 3)
    with pytest.raises(ValueError, match=r"length 3 but the target prompt has length 5.*truncate.*tile"):
        transfer_prompt(delta, src)
    with pytest.raises(ValueError, match="cannot truncate"):
        transfer_prompt(delta, src, mode="truncate")
    tiled = transfer_prompt(delta, src, mode="tile")["encoder"]["prompt"]
    np.testing.assert_array_equal(tiled, src[[0, 1, 2, 0, 1]])
    long_src = np.arange(21, dtype=np.float32).reshape(7, 3)
    np.testing.assert_array_equal(transfer_prompt(delta, long_src, mode="truncate")["encoder"]["prompt"],
                                  long_src[:5])
    np.testing.assert_array_equal(fit_length(long_src, 5, "tile"), long_src[:5])
    with pytest.raises(ValueError, match="width d_model=4"):
        transfer_prompt(delta, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="dtype float64.*cast=True"):
        transfer_prompt(delta, np.zeros((5, 3), np.float64))
    assert transfer_prompt(delta, np.ones((5, 3)), cast=True)["encoder"]["prompt"].dtype == np.float32
    with pytest.raises(ValueError, match="no 'prompt' leaf"):
        transfer_prompt({"encoder": {"lora_a": np.zeros((2, 2))}}, src)
    two = {"encoder": {"prompt": np.zeros((3, 3), np.float32)}, "decoder": {"prompt": np.zeros((3, 3), np.float32)}}
    with pytest.raises(ValueError, match="several prompt leaves"):
        transfer_prompt(two, src)
    out = transfer_prompt(two, src, path="decoder/prompt")
    np.testing.assert_array_equal(out["decoder"]["prompt"], src)
    assert out["encoder"]["prompt"] is two["encoder"]["prompt"]


def _ref_mean_cos(a, b):
    ma, mb = a.mean(0), b.mean(0)
    return float(np.dot(ma, mb) / (np.linalg.norm(ma) * np.linalg.norm(mb)))


def _ref_token_cos(a, b):
    tot = 0.0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            tot += np.dot(a[i], b[j]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))
    return tot / (a.shape[0] * b.shape[0])


def test_similarities_match_direct_numpy():
    rng = np.random.default_rng(1)
    for pa, pb in [(4, 4), (3, 7), (1, 5)]:
        a = rng.standard_normal((pa, 16)).astype(np.float32) + 0.3
        b = rng.standard_normal((pb, 16)).astype(np.float32)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        assert mean_cosine(a, b) == pytest.approx(_ref_mean_cos(a64, b64), abs=1e-12)
        assert token_cosine(a, b) == pytest.approx(_ref_token_cos(a64, b64), abs=1e-12)
    # invariants: self-similarity 1, symmetric, scale invariant
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert token_cosine(a, b) == pytest.approx(token_cosine(b, a))
    assert mean_cosine(3.0 * a, b) == pytest.approx(mean_cosine(a, b))
    with pytest.raises(ValueError, match="different widths"):
        mean_cosine(a, np.zeros((2, 3)))


def test_rank_orders_by_similarity(tmp_path):
    rng = np.random.default_rng(2)
    target = rng.standard_normal((6, 10))
    prompts = {f"s{i}": rng.standard_normal((4 + i, 10)) + (i * 0.2) * target.mean(0) for i in range(5)}
    prompts["dup"] = prompts["s3"].copy()
    for method, ref in [("mean_cosine", _ref_mean_cos), ("token_cosine", _ref_token_cos)]:
        ranked = rank(target, prompts, method=method)
        expected = sorted(((n, ref(target, p)) for n, p in prompts.items()), key=lambda t: (-t[1], t[0]))
        assert [n for n, _ in ranked] == [n for n, _ in expected]
        np.testing.assert_allclose([s for _, s in ranked], [s for _, s in expected], atol=1e-12)
    names = [n for n, _ in rank(target, prompts, exclude=("s4",))]
    assert "s4" not in names and names.index("dup") == names.index("s3") - 1  # tie broken by name
    lib = PromptLibrary(str(tmp_path / "lib"), create=True)
    for n, p in prompts.items():
        lib.add(n, p.astype(np.float32), task=n, base_id="m", base_hash="h1")
    lib.add("other_base", rng.standard_normal((4, 12)).astype(np.float32), task="x", base_id="m2",
            base_hash="h2")
    with pytest.raises(ValueError, match="other_base.*width d_model=12.*base_hash"):
        rank(target, lib)
    assert {n for n, _ in rank(target, lib, base_hash="h1")} == set(prompts)


def test_library_errors(tmp_path):
    lib = PromptLibrary(str(tmp_path / "lib"), create=True)
    x = np.ones((3, 4), np.float32)
    lib.add("a", x, task="t", base_id="m")
    with pytest.raises(LibraryError, match="already exists"):
        lib.add("a", x, task="t", base_id="m")
    with pytest.raises(LibraryError, match="invalid prompt name"):
        lib.add("../evil", x, task="t", base_id="m")
    with pytest.raises(LibraryError, match=r"expected \[length, d_model\]"):
        lib.add("b", np.ones(4, np.float32), task="t", base_id="m")
    with pytest.raises(LibraryError, match="no prompt 'zz'"):
        lib.load("zz")
    np.save(tmp_path / "lib" / "a.npy", x * 2)
    with pytest.raises(LibraryError, match="content hash differs"):
        lib.load("a")
    np.save(tmp_path / "lib" / "a.npy", np.ones((2, 4), np.float32))
    with pytest.raises(LibraryError, match=r"metadata says float32\[3, 4\]"):
        lib.load("a")
    with pytest.raises(LibraryError, match="does not exist"):
        PromptLibrary(str(tmp_path / "nope"))


def test_add_from_run(tmp_path):
    run = tmp_path / "run1"
    (run / "export").mkdir(parents=True)
    p = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    np.save(run / "export" / "encoder.prompt.npy", p)
    row = {"name": "rte_p5", "status": "finished",
           "config": {"task.name": "rte", "model.name": "t5-tiny", "peft.prompt.init": "class_labels",
                      "train.steps": 100},
           "metrics": {"accuracy": 0.6}, "best": {"accuracy": 0.65}, "wall_s": 1.0, "trainable_params": 20}
    (run / "result.json").write_text(json.dumps(row))
    lib = PromptLibrary(str(tmp_path / "lib"), create=True)
    meta = add_from_run(lib, str(run))
    assert (meta.name, meta.task, meta.base_id, meta.init, meta.steps, meta.metric_value) == \
        ("rte_p5", "rte", "t5-tiny", "class_labels", 100, 0.65)
    assert meta.base_hash is None
    (run / "export" / "delta.json").write_text(json.dumps({"base_id": "org/t5-tiny", "base_hash": "sha256:ab"}))
    meta = add_from_run(lib, str(run), name="rte_p5_b")
    assert (meta.base_id, meta.base_hash) == ("org/t5-tiny", "sha256:ab")
    assert lib.load("rte_p5").tobytes() == p.tobytes()
    row["status"] = "failed"
    (run / "result.json").write_text(json.dumps(row))
    with pytest.raises(LibraryError, match="'failed', not 'finished'"):
        add_from_run(lib, str(run), name="again")


def test_retrieval_evaluation():
    rankings = {"t1": [("a", 0.9), ("b", 0.5), ("c", 0.1)],      # perfectly ordered
                "t2": [("a", 0.9), ("b", 0.5), ("c", 0.1)],      # reversed
                "t3": [("a", 0.9), ("x", 0.8), ("b", 0.1)]}      # x has no measured gain
    gains = {("a", "t1"): 3.0, ("b", "t1"): 1.0, ("c", "t1"): -1.0,
             ("a", "t2"): -2.0, ("b", "t2"): -1.0, ("c", "t2"): 0.5,
             ("a", "t3"): -1.0, ("b", "t3"): 2.0}
    res = evaluate_retrieval(rankings, gains, ks=(1, 3))
    per, s = res["per_target"], res["summary"]
    assert per["t1"]["spearman"] == pytest.approx(1.0) and per["t1"]["kendall"] == pytest.approx(1.0)
    assert per["t2"]["spearman"] == pytest.approx(-1.0) and per["t2"]["kendall"] == pytest.approx(-1.0)
    assert per["t1"]["top1_beats_random"] and not per["t2"]["top1_beats_random"]
    assert per["t2"]["top3_beats_random"] and per["t2"]["oracle_rank"] == 3
    assert per["t3"]["n_sources"] == 2 and per["t3"]["oracle_rank"] == 2
    assert s["top1_beats_random_rate"] == pytest.approx(1 / 3)
    assert s["top3_beats_random_rate"] == pytest.approx(1.0)
    assert s["mean_top1_gain"] == pytest.approx((3.0 - 2.0 - 1.0) / 3)
    assert s["mean_random_gain"] == pytest.approx((1.0 + (-2.5 / 3) + 0.5) / 3)
    assert s["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert per["t3"]["kendall"] == pytest.approx(-1.0)  # two sources, discordant
    g = gains_from_scores({("a", "t"): 0.8}, {"t": 0.7})
    assert g[("a", "t")] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="baseline score for target 'u'"):
        gains_from_scores({("a", "u"): 0.8}, {"t": 0.7})


def test_spot_cli(tmp_path, capsys):
    rng = np.random.default_rng(4)
    base_dir = rng.standard_normal(8)
    lib, tlib = str(tmp_path / "lib"), str(tmp_path / "targets")
    rows = ["source,target,gain"]
    for i, task in enumerate(["mnli", "qqp", "sst2", "imdb"]):
        direction = base_dir if task in ("sst2", "imdb") else -base_dir
        f = tmp_path / f"{task}.npy"
        np.save(f, (rng.standard_normal((4, 8)) * 0.1 + direction).astype(np.float32))
        assert spot_main(["add", lib, f"{task}_p4", "--prompt", str(f), "--task", task, "--base-id", "m",
                          "--metric", "accuracy=0.8", "--steps", "10"]) == 0
        tf = tmp_path / f"t_{task}.npy"
        np.save(tf, (rng.standard_normal((4, 8)) * 0.1 + direction).astype(np.float32))
        assert spot_main(["add", tlib, f"t_{task}", "--prompt", str(tf), "--task", task, "--base-id", "m"]) == 0
    for s in ["mnli", "qqp", "sst2", "imdb"]:
        for t in ["mnli", "qqp", "sst2", "imdb"]:
            if s != t:
                same = (s in ("sst2", "imdb")) == (t in ("sst2", "imdb"))
                rows.append(f"{s},{t},{1.0 if same else -1.0}")
    (tmp_path / "gains.csv").write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert spot_main(["list", lib]) == 0
    out = capsys.readouterr().out
    assert "sst2_p4" in out and "4 prompt(s)" in out
    assert spot_main(["inspect", lib, "qqp_p4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "qqp" and info["metric_value"] == 0.8 and info["length"] == 4
    assert spot_main(["rank", lib, "--target", str(tmp_path / "t_sst2.npy"), "--exclude-task", "sst2",
                      "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked[0][0] == "imdb_p4" and len(ranked) == 3
    r = rankings_for_targets(PromptLibrary(lib), PromptLibrary(tlib))
    assert r["sst2"][0][0] == "imdb" and "sst2" not in [s for s, _ in r["sst2"]]
    out_json = tmp_path / "summary.json"
    assert spot_main(["eval-retrieval", "--gains", str(tmp_path / "gains.csv"), "--library", lib,
                      "--targets", tlib, "--out", str(out_json)]) == 0
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["n_targets"] == 4 and summary["top1_beats_random_rate"] == 1.0
    assert summary["mean_oracle_rank"] == 1.0
    assert spot_main(["add", lib, "x", "--prompt", str(tmp_path / "sst2.npy")]) == 2
    assert "missing --task, --base-id" in capsys.readouterr().err


def _finished_run(root, name, prompt, **cfg):
    """A run folder as the runner leaves it: ``delta/`` (the saved delta) + result.json."""
    from peft_jax.peft.delta_io import save_delta
    save_delta(str(root / "delta"), {"peft": {"prompt": prompt}}, base_id="org/tiny", base_hash="sha256:cd")
    row = {"name": name, "status": "finished", "steps": cfg.pop("steps", 300),
           "config": {"task.name": "sst2", "model.name": "tiny", "peft.prompt.init": "uniform",
                      "seed": 0, "train.steps": 300, **cfg}, "metrics": {"accuracy": 0.7}}
    (root / "result.json").write_text(json.dumps(row))
    return root


def test_add_from_run_reads_the_runs_delta_with_metadata(tmp_path, capsys):
    """``spot add --from-run`` with no exported .npy: the prompt comes bit-exactly from the
    run's ``delta/``, with task, base id/hash, length, init, seed, steps, dev metric."""
    p = _awkward_prompt(np.random.default_rng(4), 5, 8)
    run = _finished_run(tmp_path / "run", "sst2_run", p, seed=3)
    lib = str(tmp_path / "lib")
    assert spot_main(["add", lib, "--from-run", str(run)]) == 0
    meta = PromptLibrary(lib).meta("sst2_run")
    assert (meta.task, meta.base_id, meta.base_hash, meta.length, meta.d_model, meta.init, meta.seed,
            meta.steps, meta.metric, meta.metric_value) == \
        ("sst2", "org/tiny", "sha256:cd", 5, 8, "uniform", 3, 300, "accuracy", 0.7)
    assert PromptLibrary(lib).load("sst2_run").tobytes() == p.tobytes()
    # a run whose delta has no prompt: the error says so
    from peft_jax.peft.delta_io import save_delta
    save_delta(str(tmp_path / "lora" / "delta"), {"peft": {"q": {"lora_a": np.ones((2, 2), np.float32)}}},
               base_id="b", base_hash="h")
    (tmp_path / "lora" / "result.json").write_text((run / "result.json").read_text())
    capsys.readouterr()
    assert spot_main(["add", lib, "x", "--from-run", str(tmp_path / "lora")]) == 2
    assert "expected one soft prompt in the run's delta, found []" in capsys.readouterr().err


def test_shared_init_warning_when_prompts_trained_too_little(tmp_path, capsys):
    """Prompts from the same init (init and seed) compared after < 1000 steps are flagged by
    rank / eval-retrieval; different seeds, or long training, are not."""
    from peft_jax.transfer.library import shared_init_warnings
    rng = np.random.default_rng(0)
    lib = PromptLibrary(str(tmp_path / "lib"), create=True)
    for name, seed, steps in (("a", 0, 20), ("b", 0, 20), ("c", 1, 20), ("d", 2, 5000), ("e", 2, 5000)):
        lib.add(name, rng.standard_normal((4, 8)).astype(np.float32), task=name, base_id="m",
                init="uniform", seed=seed, steps=steps)
    warns = shared_init_warnings(lib.list())
    assert len(warns) == 1 and "['a', 'b'] share init='uniform' seed=0" in warns[0]
    lib.add("f", rng.standard_normal((4, 8)).astype(np.float32), task="f", base_id="m", init="file",
            seed=0, steps=1)
    assert len(shared_init_warnings(lib.list())) == 1         # a transferred prompt: no shared init
    capsys.readouterr()
    assert spot_main(["rank", str(tmp_path / "lib"), "--target", "a"]) == 0
    assert "share init='uniform' seed=0" in capsys.readouterr().err


def test_spot_table_mrr_and_gains():
    """The pipeline's table from measured scores: gains over uniform init, MRR of the best
    source per similarity, the retrieved top-1's gain beside the best source's."""
    from peft_jax.transfer.pipeline import markdown, spot_table
    scores = {"cr": {"uniform": 0.60, "class_labels": 0.70, "from:sst2": 0.80, "from:trec": 0.55},
              "mr": {"uniform": 0.50, "class_labels": 0.52, "from:sst2": 0.58, "from:trec": float("nan")}}
    rankings = {"mean_cosine": {"cr": [("trec", 0.9), ("sst2", 0.5)], "mr": [("sst2", 0.7), ("trec", 0.2)]},
                "token_cosine": {"cr": [("sst2", 0.9), ("trec", 0.5)], "mr": [("sst2", 0.7), ("trec", 0.2)]}}
    res = spot_table(scores, rankings, ["sst2", "trec"], ks=(1,))
    assert res["gains"]["cr"] == pytest.approx({"sst2": 0.20, "trec": -0.05})
    assert res["gains"]["mr"] == pytest.approx({"sst2": 0.08})          # the failed run is left out
    mc, tc = res["retrieval"]["mean_cosine"]["summary"], res["retrieval"]["token_cosine"]["summary"]
    assert mc["mrr"] == pytest.approx((1 / 2 + 1) / 2) and tc["mrr"] == pytest.approx(1.0)
    assert mc["mean_top1_gain"] == pytest.approx((-0.05 + 0.08) / 2)
    assert tc["mean_top1_gain"] == pytest.approx(mc["mean_oracle_gain"]) == pytest.approx(0.14)
    md = markdown(res)
    assert "| cr | 60.0 | 70.0 | sst2 (+20.0) | trec (-5.0) | sst2 (+20.0) |" in md
    assert "| mean_cosine | 0.750 | +1.5 | +14.0 | 0.50 |" in md
