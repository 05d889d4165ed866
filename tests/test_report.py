"""Report: collecting result rows, mean/std over seeds, text/CSV/Markdown tables, plots."""

import csv
import json
import math

import numpy as np
import pytest

from peft_jax.report import (ReportError, aggregate, collect, format_table, plot_ablation,
                             plot_transfer_heatmap, report_main, row_value, to_markdown,
                             transfer_matrix, varying_keys, write_csv, write_result)

LENGTHS, INITS, SEEDS = (1, 5, 20), ("class_labels", "uniform"), (13, 21, 42)
PNG = b"\x89PNG\r\n\x1a\n"


def _row(name, length, init, seed, acc, status="finished", **cfg):
    return {"name": name, "status": status,
            "config": {"peft.prompt.length": length, "peft.prompt.init": init, "train.seed": seed,
                       "task.name": "sst2", "train.lr": 0.3, "workdir": f"/w/{name}", **cfg},
            "metrics": {"accuracy": acc, "loss": 1 - acc}, "best": {"accuracy": acc + 0.01},
            "wall_s": 1.5, "trainable_params": length * 8}


@pytest.fixture
def results(tmp_path):
    """Writes an ablation grid (+ one failed run, + a stray file); returns root and the rows."""
    rng = np.random.default_rng(0)
    root = tmp_path / "sweep"
    rows = []
    for length in LENGTHS:
        for init in INITS:
            for seed in SEEDS:
                name = f"len{length}-{init}-s{seed}"
                row = _row(name, length, init, seed, float(rng.uniform(0.5, 0.95)))
                write_result(str(root / name), row)
                rows.append(row)
    write_result(str(root / "broken"), _row("broken", 5, "uniform", 99, 0.0, status="failed"))
    (root / "notes.txt").write_text("not a result")
    return root, rows


def test_collect_and_lookup(results):
    root, rows = results
    got = collect(str(root))
    assert len(got) == len(rows) and all(r["status"] == "finished" for r in got)
    assert len(collect(str(root), include_failed=True)) == len(rows) + 1
    r = got[0]
    assert row_value(r, "accuracy") == row_value(r, "metrics.accuracy") == r["metrics"]["accuracy"]
    assert row_value(r, "best.accuracy") == r["best"]["accuracy"]
    assert row_value(r, "peft.prompt.length") == r["config"]["peft.prompt.length"]
    assert row_value(r, "trainable_params") == r["config"]["peft.prompt.length"] * 8
    assert row_value(r, "nope") is None
    assert varying_keys(got, exclude=["train.seed"]) == ["peft.prompt.init", "peft.prompt.length"]
    with pytest.raises(ReportError, match="does not exist"):
        collect(str(root / "missing"))


def test_aggregate_mean_std_over_seeds(results):
    root, rows = results
    table = aggregate(collect(str(root)), ["peft.prompt.length", "peft.prompt.init"], ["accuracy", "loss"])
    assert [(e["peft.prompt.length"], e["peft.prompt.init"]) for e in table] == \
        [(l, i) for l in LENGTHS for i in INITS]  # numeric order of lengths, then init
    for e in table:
        accs = [r["metrics"]["accuracy"] for r in rows if r["config"]["peft.prompt.length"] == e["peft.prompt.length"]
                and r["config"]["peft.prompt.init"] == e["peft.prompt.init"]]
        assert e["n"] == 3 and e["seeds"] == list(SEEDS) and e["accuracy_n"] == 3
        assert e["accuracy_mean"] == pytest.approx(sum(accs) / 3, abs=1e-12)
        m = sum(accs) / 3
        assert e["accuracy_std"] == pytest.approx(math.sqrt(sum((a - m) ** 2 for a in accs) / 2), abs=1e-12)
        assert e["loss_mean"] == pytest.approx(1 - e["accuracy_mean"], abs=1e-12)
    by_len = aggregate(rows, ["peft.prompt.length"], ["accuracy"])
    assert [e["n"] for e in by_len] == [6, 6, 6]
    single = aggregate(rows[:1], ["peft.prompt.length"], ["accuracy"])
    assert single[0]["n"] == 1 and math.isnan(single[0]["accuracy_std"])
    with pytest.warns(UserWarning, match=r"same run \(identical config\) is counted more than once"):
        aggregate(rows + [dict(rows[0], name="copy")], ["peft.prompt.length", "peft.prompt.init"], ["accuracy"])
    with pytest.raises(ReportError, match="no result rows"):
        aggregate([], ["a"], ["accuracy"])


def test_tables_text_markdown_csv(results, tmp_path):
    root, rows = results
    keys = ["peft.prompt.length", "peft.prompt.init"]
    table = aggregate(collect(str(root)), keys, ["accuracy"])
    text = format_table(table, keys, ["accuracy"], digits=2, scale=100)
    lines = text.splitlines()
    assert lines[0].split() == keys + ["n", "accuracy"] and set(lines[1]) <= {"-", " "}
    e = table[0]
    cell = f"{e['accuracy_mean'] * 100:.2f} ({e['accuracy_std'] * 100:.2f})"
    assert lines[2].endswith(cell) and lines[2].startswith("1 ")
    assert len({len(line) for line in lines[2:]}) == 1  # right-aligned numbers: equal widths
    md = to_markdown(table, keys, ["accuracy"], digits=2, scale=100).splitlines()
    assert md[0] == "| peft.prompt.length | peft.prompt.init | n | accuracy |"
    assert md[1] == "| --- | --- | ---: | ---: |" and len(md) == 2 + len(table)
    assert md[2] == f"| 1 | class_labels | 3 | {cell} |"
    path = tmp_path / "t.csv"
    write_csv(table, keys, ["accuracy"], str(path))
    back = list(csv.DictReader(open(path)))
    assert len(back) == len(table)
    assert float(back[3]["accuracy_mean"]) == pytest.approx(table[3]["accuracy_mean"], rel=1e-12)
    assert float(back[3]["accuracy_std"]) == pytest.approx(table[3]["accuracy_std"], rel=1e-12)


def test_transfer_matrix_and_plots(tmp_path):
    rows = []
    vals = {("mnli", "rte"): [0.70, 0.72], ("mnli", "cb"): [0.80], ("sst2", "rte"): [0.60]}
    for (s, t), vs in vals.items():
        for i, v in enumerate(vs):
            rows.append({"config": {"transfer.source": s, "task.name": t, "train.seed": i}, "metrics": {"accuracy": v}})
    for t, v in [("rte", 0.62), ("rte", 0.64), ("cb", 0.85)]:
        rows.append({"config": {"transfer.source": "", "task.name": t}, "metrics": {"accuracy": v}})
    s, t, m = transfer_matrix(rows, "accuracy")
    assert s == ["mnli", "sst2"] and t == ["cb", "rte"]
    np.testing.assert_allclose(m, [[0.80, 0.71], [np.nan, 0.60]])
    _, _, g = transfer_matrix(rows, "accuracy", relative=True)
    np.testing.assert_allclose(g, [[0.80 - 0.85, 0.71 - 0.63], [np.nan, 0.60 - 0.63]])
    with pytest.raises(ReportError, match=r"baseline rows .* targets \['cb'\]"):
        transfer_matrix([r for r in rows if not (r["config"]["task.name"] == "cb" and
                                                 r["config"]["transfer.source"] == "")], "accuracy", relative=True)
    out = plot_transfer_heatmap(s, t, g, str(tmp_path / "h.png"), relative=True)
    assert open(out, "rb").read(8) == PNG
    table = aggregate([_row(f"r{i}", l, "u", i, 0.5 + 0.01 * l) for i, l in enumerate(LENGTHS)],
                      ["peft.prompt.length", "peft.prompt.init"], ["accuracy"])
    assert open(plot_ablation(table, "peft.prompt.length", "peft.prompt.init", "accuracy",
                              str(tmp_path / "a.png")), "rb").read(8) == PNG
    with pytest.raises(ReportError, match="'train.lr' is not a grouping key"):
        plot_ablation(table, "train.lr", None, "accuracy", str(tmp_path / "b.png"))


def test_report_main(results, tmp_path, capsys):
    root, rows = results
    out = tmp_path / "o"
    out.mkdir()
    rc = report_main([str(root), "--metric", "accuracy", "--csv", str(out / "t.csv"), "--md", str(out / "t.md"),
                      "--plot-ablation", str(out / "abl.png"), "--scale", "100", "--digits", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "18 run(s) in 6 group(s)" in text and "peft.prompt.init" in text.splitlines()[0]
    assert (out / "t.md").read_text().count("\n") == 8
    assert open(out / "abl.png", "rb").read(8) == PNG
    assert len(list(csv.DictReader(open(out / "t.csv")))) == 6
    assert report_main([str(tmp_path / "o")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert json.loads((root / "broken" / "result.json").read_text())["status"] == "failed"


def test_report_main_runner_rows_seed_and_baseline(tmp_path, capsys):
    """Rows as peft_jax.experiment writes them: the seed is config key 'seed' (not 'train.seed')
    and the untrained eval is under 'baseline'; by default seeds are averaged, not grouped."""
    root = tmp_path / "runs"
    accs = {}
    for length in (2, 5):
        for seed in (0, 1, 2):
            acc = 0.6 + 0.1 * length / 5 + 0.01 * seed
            accs.setdefault(length, []).append(acc)
            row = {"name": f"l{length}s{seed}", "status": "finished",
                   "config": {"peft.prompt.length": length, "seed": seed, "workdir": f"/w/{length}/{seed}"},
                   "metrics": {"accuracy": acc}, "baseline": {"accuracy": 0.5 + 0.01 * seed}}
            write_result(str(root / f"l{length}s{seed}"), row)
    assert row_value(row, "baseline.accuracy") == pytest.approx(0.52)
    assert report_main([str(root), "--metric", "accuracy,baseline.accuracy", "--csv", str(tmp_path / "t.csv")]) == 0
    assert "6 run(s) in 2 group(s)" in capsys.readouterr().out
    got = {int(r["peft.prompt.length"]): r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    for length in (2, 5):
        assert float(got[length]["accuracy_mean"]) == pytest.approx(np.mean(accs[length]))
        assert float(got[length]["baseline.accuracy_mean"]) == pytest.approx(0.51)


def test_export_rows_round_trip_keeps_curves_and_convergence(tmp_path):
    """Rows exported for committing (config subset + curves) load back with the same
    table and the same convergence check as the run folders they came from."""
    from peft_jax.report import export_rows, late_move, load_rows, history
    root = tmp_path / "runs"
    rows = []
    for seed, (a, b) in enumerate(((0.70, 0.705), (0.60, 0.80))):
        name = f"s{seed}"
        row = _row(name, 5, "uniform", seed, b)
        row["steps"], row["baseline"] = 100, {"accuracy": 0.5}
        d = root / name
        write_result(str(d), row)
        with open(d / "metrics.jsonl", "w") as f:
            for step, acc in ((50, 0.65), (80, a), (100, b)):
                f.write(json.dumps({"step": step, "eval/accuracy": acc, "train/loss": 1 - acc}) + "\n")
            f.write('{"step": 10')   # a line cut by a kill is skipped
        rows.append({**row, "_dir": str(d)})
    path = export_rows(rows, str(tmp_path / "res" / "x.jsonl"), keys=["peft.prompt.length", "train.seed"])
    back = load_rows(path)
    assert [r["name"] for r in back] == ["s0", "s1"]
    assert back[0]["config"] == {"peft.prompt.length": 5, "train.seed": 0}
    for orig, got in zip(rows, back):
        for key in ("eval/accuracy", "train/loss"):
            s0, v0 = history(orig, key)
            s1, v1 = history(got, key)
            np.testing.assert_array_equal(s0, s1)
            np.testing.assert_allclose(v0, v1, atol=1e-6)
        assert late_move(got, "accuracy") == pytest.approx(late_move(orig, "accuracy"))
    assert late_move(back[0], "accuracy") == pytest.approx(0.005)   # steps >= 80: 0.70, 0.705
    assert late_move(back[1], "accuracy") == pytest.approx(0.20)
    agg = aggregate(back, ["peft.prompt.length"], ["accuracy"], seed_key="train.seed")
    assert agg[0]["n"] == 2 and agg[0]["accuracy_mean"] == pytest.approx(0.7525)
    with pytest.raises(ReportError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"name": 1}\n')
    with pytest.raises(ReportError, match="bad.jsonl:1: not a result row"):
        load_rows(str(tmp_path / "bad.jsonl"))
