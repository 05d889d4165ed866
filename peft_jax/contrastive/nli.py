"""NLI triplets ``(anchor, positive, hard negative)`` for supervised SimCSE.

SimCSE (Gao et al. 2021) builds them from SNLI+MNLI: the premise is the anchor, an
entailment hypothesis of that premise the positive, a contradiction hypothesis of the *same*
premise the hard negative. :func:`nli_triplets` does this for any list of NLI examples
(``sentence1`` = premise, ``sentence2`` = hypothesis, integer ``label`` indexing
``label_names``), e.g. SICK-E from ``peft_jax.data``; :func:`read_triplets_tsv` reads
user-made triplet files (3 tab-separated columns, e.g. SimCSE's ``nli_for_simcse.csv``
converted to TSV).

A premise with an entailment but no contradiction hypothesis is handled by
``missing_negative``:

- ``"drop"`` (SimCSE's data): no triplet.
- ``"neutral"``: a neutral hypothesis of the same premise, else dropped.
- ``"random"``: a neutral hypothesis of the same premise, else a hypothesis of another
  premise drawn with ``seed`` (an extra, easy in-batch negative: the loss still sees the
  other rows' positives and negatives).

SICK-E train has 3,146 distinct premises, 1,142 with an entailment hypothesis and only 107
with both entailment and contradiction: ``"drop"`` gives 141 triplets, ``"neutral"`` 503,
``"random"`` 1,284 (every entailment pair). For SICK a fallback keeps the entailment pairs,
the main training signal; SimCSE's own NLI data (``"drop"``) has a contradiction for each.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

Triplet = tuple[str, str, str]
MISSING_NEGATIVE = ("drop", "neutral", "random")


def _norm(s: Any) -> str:
    return " ".join(str(s).split())


def nli_triplets(examples: Iterable[Mapping[str, Any]], label_names: Sequence[str],
                 missing_negative: str = "drop", seed: int = 0) -> list[Triplet]:
    """Triplets from NLI examples (``sentence1``, ``sentence2``, ``label``).

    One triplet per (premise, entailment hypothesis) pair, in first-occurrence order; the
    hard negative is the premise's first contradiction hypothesis (then, per
    ``missing_negative``, its first neutral one or a seeded random other hypothesis).
    ``label_names`` must contain ``entailment`` and ``contradiction`` (``neutral`` optional).
    """
    if missing_negative not in MISSING_NEGATIVE:
        raise ValueError(f"missing_negative={missing_negative!r}: expected one of {MISSING_NEGATIVE}")
    names = [str(n).lower() for n in label_names]
    for need in ("entailment", "contradiction"):
        if need not in names:
            raise ValueError(f"label_names {tuple(label_names)} has no {need!r} label")
    ent, con = names.index("entailment"), names.index("contradiction")
    neu = names.index("neutral") if "neutral" in names else None
    by: dict[str, dict[int, list[str]]] = {}
    for i, ex in enumerate(examples):
        for f in ("sentence1", "sentence2", "label"):
            if f not in ex:
                raise ValueError(f"NLI example {i} has no field {f!r} (fields: {sorted(ex)})")
        p, h = _norm(ex["sentence1"]), _norm(ex["sentence2"])
        if p and h:
            lst = by.setdefault(p, {}).setdefault(int(ex["label"]), [])
            if h not in lst:
                lst.append(h)
    hyps = [h for d in by.values() for lst in d.values() for h in lst]
    rng = np.random.default_rng(seed)
    out: list[Triplet] = []
    for p, d in by.items():
        for pos in d.get(ent, []):
            if d.get(con):
                neg: Optional[str] = d[con][0]
            elif missing_negative != "drop" and neu is not None and d.get(neu):
                neg = d[neu][0]
            elif missing_negative == "random":
                own = {h for lst in d.values() for h in lst} | {p}
                others = [h for h in hyps if h not in own]
                neg = others[int(rng.integers(len(others)))] if others else None
            else:
                neg = None
            if neg is not None:
                out.append((p, pos, neg))
    return out


def read_triplets_tsv(path: str) -> list[Triplet]:
    """``anchor<TAB>positive<TAB>hard negative`` per line (blank lines skipped; a first line
    ``sent0 sent1 hard_neg`` / ``anchor positive negative`` is taken as a header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"triplet file {path!r} does not exist")
    out: list[Triplet] = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise ValueError(f"{path}:{ln}: expected 3 tab-separated columns "
                                 f"(anchor, positive, hard negative), got {len(cols)}")
            if ln == 1 and [c.strip().lower() for c in cols] in (
                    ["sent0", "sent1", "hard_neg"], ["anchor", "positive", "negative"]):
                continue
            t = tuple(_norm(c) for c in cols)
            if not all(t):
                raise ValueError(f"{path}:{ln}: empty column in triplet")
            out.append(t)  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"triplet file {path!r} has no triplets")
    return out


def load_triplets(source: str, split: str = "train", data_dir: Optional[str] = None,
                  missing_negative: str = "drop", seed: int = 0) -> list[Triplet]:
    """A triplet TSV file, or a ``peft_jax.data`` NLI task name (e.g. ``sick-e``) whose
    ``split`` is turned into triplets by :func:`nli_triplets`."""
    if os.path.isfile(source):
        return read_triplets_tsv(source)
    from peft_jax.data import get_task
    task = get_task(source)
    labels = getattr(task, "label_names", None)
    if not labels:
        raise ValueError(f"task {source!r} has no label names; supervised SimCSE needs an NLI "
                         "task with entailment/contradiction labels or a triplet TSV file")
    return nli_triplets(task.load(split, data_dir), labels, missing_negative, seed)
