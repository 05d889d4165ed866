"""Training-trajectory parity with torch + HF PEFT (see ``_trajectory``): 5 AdamW steps from
identical weights, data order and hyper-parameters through the peft_jax runner and through
HF PEFT; the trained deltas must agree to 1e-5 relative (max abs difference / max |delta|).

Forward parity cannot catch a wrong loss mask, a wrong optimizer mask or a wrong gradient;
this can. A float64 run of the torch side is the reference that says how much of the
difference is each float32 implementation's own rounding: peft_jax must be as close to it
as torch is. ``python tests/_trajectory.py`` prints the table for all cases.
"""

import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _trajectory as T  # noqa: E402

TARGET = 1e-5


@pytest.mark.parametrize("name", [
    "t5_prompt",
    "llama_lora",
    pytest.param("bert_lora_head", marks=pytest.mark.slow),
    pytest.param("llama_prefix", marks=pytest.mark.slow),
])
def test_five_adamw_steps_match_hf_peft(name, shared_data, tmp_path, request):
    minilm = request.getfixturevalue("minilm_path") if name.startswith("bert") else None
    row = T.run_case(name, str(tmp_path), minilm)
    print("\n" + T.table([row]))
    assert row["delta"] > 4 * T.LR                  # 5 steps of ~lr each: it trained
    assert row["relative"] <= TARGET, row
    # peft_jax's own float32 error is of the size of torch's (both against float64)
    assert row["jax_fp32_error"] <= max(TARGET, 2 * row["torch_fp32_error"]), row
