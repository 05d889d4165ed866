"""SentEval-style surface probing tasks (Conneau et al. 2018) built from any text.

- ``length`` (SentLen): the sentence's number of words in 6 bins
  (``<=8, 9-12, 13-16, 17-20, 21-25, >=26``), balanced by subsampling each bin;
- ``wc`` (WordContent): which of ``k`` mid-frequency words (frequency ranks
  ``rank_lo..rank_lo + k`` among words of >= 3 letters) the sentence contains; sentences
  containing exactly one of them, balanced.

Labels come from the text itself, so a probe's accuracy measures what the representation
keeps about the surface form. Splits are disjoint seeded draws (``train``/``dev``/``test``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

LENGTH_EDGES = (8, 12, 16, 20, 25)
SURFACE_TASKS = ("length", "wc")


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """A probing task: texts and integer labels per split, and the label names."""

    name: str
    label_names: tuple
    splits: dict   # split -> (texts list, labels np.ndarray)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def length_bin(text: str) -> int:
    return int(np.searchsorted(LENGTH_EDGES, len(text.split()), side="left"))


def _balanced_splits(texts: list, labels: np.ndarray, num_classes: int, sizes: dict,
                     seed: int) -> dict:
    """Disjoint per-class-balanced draws of ``sizes[split]`` examples."""
    rng = np.random.default_rng(seed)
    by = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    need = sum(sizes.values())
    per = need // num_classes
    short = [c for c in range(num_classes) if len(by[c]) < per]
    if short:
        raise ValueError(f"surface task: classes {short} have fewer than {per} examples; use "
                         "more text or smaller splits")
    out, start = {}, 0
    for split, n in sizes.items():
        k = n // num_classes
        idx = np.concatenate([b[start:start + k] for b in by])
        idx = idx[rng.permutation(len(idx))]
        out[split] = ([texts[i] for i in idx], labels[idx])
        start += k
    return out


def length_task(texts: Sequence[str], sizes: dict, seed: int = 0) -> ProbeTask:
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    labels = np.asarray([length_bin(t) for t in texts])
    names = ("<=8", "9-12", "13-16", "17-20", "21-25", ">=26")
    return ProbeTask("length", names, _balanced_splits(texts, labels, len(names), sizes, seed))


def word_content_task(texts: Sequence[str], sizes: dict, k: int = 10, rank_lo: int = 200,
                      seed: int = 0) -> ProbeTask:
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    toks = [set(w.lower() for w in t.split()) for t in texts]
    freq = collections.Counter(w for ws in toks for w in ws if w.isalpha() and len(w) >= 3)
    words = [w for w, _ in freq.most_common()][rank_lo:rank_lo + k]
    if len(words) < k:
        raise ValueError(f"word content: only {len(words)} candidate words past rank {rank_lo}")
    index = {w: i for i, w in enumerate(words)}
    keep, labels = [], []
    for t, ws in zip(texts, toks):
        hit = [index[w] for w in ws if w in index]
        if len(hit) == 1:
            keep.append(t)
            labels.append(hit[0])
    return ProbeTask("wc", tuple(words), _balanced_splits(keep, np.asarray(labels), k, sizes, seed))


def surface_task(name: str, texts: Sequence[str], sizes: dict, seed: int = 0) -> ProbeTask:
    if name == "length":
        return length_task(texts, sizes, seed)
    if name == "wc":
        return word_content_task(texts, sizes, seed=seed)
    raise ValueError(f"surface task {name!r}: choose from {SURFACE_TASKS}")
