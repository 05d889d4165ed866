"""Prompt variance: the grid, the spread statistics and table, the CLI's argument checks,
and (slow) a zero-shot grid on SmolLM2 with real data."""

from __future__ import annotations

import numpy as np
import pytest

from peft_jax.fewshot import prompt_variance as pv


def test_spread_and_table_over_prompts_and_seeds():
    s = pv.spread([0.5, 0.9, 0.7, 0.6])
    assert s == pytest.approx({"n": 4, "min": 0.5, "median": 0.65, "max": 0.9,
                              "std": np.std([.5, .9, .7, .6])})

    def row(setting, prompt, acc, ece):
        return {"config": {"task.name": "lmbff/sst2", "fewshot.method": setting,
                           "fewshot.prompt": prompt}, "metrics": {"accuracy": acc, "ece": ece}}

    rows = [row("prompt", "p0", 0.8, 0.1), row("prompt", "p0", 0.9, 0.3),   # two seeds: 85
            row("prompt", "p1", 0.7, 0.2), row("zeroshot", "p0", 0.5, 0.4)]
    md = pv.spread_table(rows).splitlines()
    assert md[2] == "| lmbff/sst2 | zeroshot | 1 | 50.0 | 50.0 | 50.0 | 0.0 | 0.400 |"
    assert md[3] == "| lmbff/sst2 | prompt | 2 | 70.0 | 77.5 | 85.0 | 7.5 | 0.200 |"


def test_grid_is_templates_by_word_sets():
    g = pv.prompt_grid("lmbff/sst2", 2, search=False)
    assert len(g) == 2 * len(pv.WORDS["sentiment"])
    assert {x.template for x in g} == set(pv.TEMPLATES["sentiment"][:2])
    assert all("{sentence}" in x.template and "{mask}" in x.template for x in g)
    with pytest.raises(ValueError, match="no prompt set"):
        pv.prompt_grid("lmbff/trec", 1, search=False)


def test_cli_rejects_bad_settings(capsys):
    with pytest.raises(SystemExit):
        pv.prompts_main(["--settings", "zeroshot,bogus"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pv.prompts_main(["--max-prompts", "prompt=x"])


@pytest.mark.slow
def test_zero_shot_grid_on_smollm2_equals_the_zeroshot_method(shared_data, smollm2_gguf, tmp_path):
    from peft_jax.fewshot.methods import Budget
    from peft_jax.models.registry import load_pretrained

    pre = load_pretrained("smollm2")
    grid = pv.prompt_grid("lmbff/sst2", 1, search=True, pre=pre, seed=13)
    assert grid[-1].source == "search" and len(grid[-1].words.split(",")) == 2
    b = Budget(test_examples=16)
    rows = [pv.run_prompt("zeroshot", spec, k, "lmbff/sst2", 13, "smollm2", b, str(tmp_path), pre)
            for k, spec in enumerate(grid[:2])]
    for r in rows:
        assert {"accuracy", "ece", "accuracy_cc", "ece_cc"} <= set(r["metrics"])
    # a finished cell is read back, not rerun
    again = pv.run_prompt("zeroshot", grid[0], 0, "lmbff/sst2", 13, "smollm2", b, str(tmp_path))
    assert again["metrics"] == rows[0]["metrics"]
    # one forward per template scores every word set exactly as the runner does
    fast = pv.zeroshot_grid(pre, "lmbff/sst2", grid[:2], 16, str(tmp_path / "fast"), "smollm2")
    for f, r in zip(fast, rows):
        for m in ("accuracy", "ece", "accuracy_cc", "ece_cc"):
            assert f["metrics"][m] == pytest.approx(r["metrics"][m], abs=1e-4)
    assert "zeroshot | 2 |" in pv.spread_table(rows)
