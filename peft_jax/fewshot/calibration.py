"""How far to trust a prompt's probabilities: calibration error and contextual calibration.

- :func:`ece`: expected calibration error (Guo et al. 2017): predictions are put in
  ``n_bins`` equal-width bins of confidence ``max_c p(c | x)``;
  ``ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``.
- :func:`reliability` / :func:`plot_reliability`: the per-bin numbers and the diagram.
- Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the label
  probabilities of content-free inputs (``"N/A"``, ``""``, ``"[MASK]"``) in the same prompt
  estimate the prompt's bias ``p_cf`` (their mean, renormalized); every prediction is then
  re-weighted with ``W = diag(p_cf)^-1``, ``b = 0``: ``q = softmax(W p)`` where ``p`` are
  the label probabilities (normalized over the label words).

Class scores here are the verbalizer's log-scores ``[n, C]`` (any additive constant per row
is irrelevant: :func:`label_probs` renormalizes over the labels).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

CONTENT_FREE = ("N/A", "", "[MASK]")


def label_probs(scores: np.ndarray) -> np.ndarray:
    """Softmax over the class axis of scores ``[n, C]`` (log-probabilities or logits)."""
    s = np.asarray(scores, np.float64)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Per-bin ``count``, ``confidence`` (mean max-probability) and ``accuracy`` (NaN for an
    empty bin) over ``n_bins`` equal-width bins of ``(0, 1]`` (bin ``b`` holds
    ``b/n < conf <= (b+1)/n``)."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"reliability: probs {p.shape} and labels {y.shape} must be [n, C] and [n]")
    conf = p.max(-1)
    hit = (p.argmax(-1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(b, hit, n_bins) / count
        mean_conf = np.bincount(b, conf, n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": acc,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of probabilities ``[n, C]`` against ``labels [n]``."""
    r = reliability(probs, labels, n_bins)
    n = r["count"].sum()
    keep = r["count"] > 0
    return float(np.sum(r["count"][keep] / n
                        * np.abs(r["accuracy"][keep] - r["confidence"][keep])))


def content_free_prior(cf_scores: np.ndarray) -> np.ndarray:
    """``p_cf [C]``: the mean of the content-free inputs' label probabilities ``[m, C]``,
    renormalized (Zhao et al.)."""
    p = label_probs(cf_scores).mean(0)
    return p / p.sum()


def contextual_calibrate(scores: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """Calibrated probabilities ``softmax(W p)``, ``W = diag(p_cf)^-1``, ``b = 0``, where
    ``p = label_probs(scores)`` ``[n, C]``."""
    p = label_probs(scores)
    w = 1.0 / np.maximum(np.asarray(p_cf, np.float64), 1e-12)
    return label_probs(p * w[None, :])


def calibration_metrics(scores: np.ndarray, labels: np.ndarray,
                        cf_scores: Optional[np.ndarray] = None, n_bins: int = 10) -> dict:
    """``{"ece"}`` of the scores and, with content-free scores, the calibrated
    ``accuracy_cc`` / ``ece_cc`` and the prior ``p_cf``."""
    y = np.asarray(labels)
    p = label_probs(scores)
    out = {"ece": ece(p, y, n_bins)}
    if cf_scores is not None:
        prior = content_free_prior(cf_scores)
        q = contextual_calibrate(scores, prior)
        out.update(accuracy_cc=float(np.mean(q.argmax(-1) == y)), ece_cc=ece(q, y, n_bins),
                   p_cf=[float(v) for v in prior])
    return out


def pool_bins(bins: Sequence[dict]) -> dict:
    """Reliability bins of several runs merged (count-weighted means per bin)."""
    count = np.sum([np.asarray(b["count"], np.float64) for b in bins], 0)
    out = {"count": count}
    for f in ("confidence", "accuracy"):
        tot = np.sum([np.asarray(b["count"]) * np.nan_to_num(np.asarray(b[f], np.float64))
                      for b in bins], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f] = tot / count
    return out


def bins_ece(bins: dict) -> float:
    """ECE from reliability bins."""
    c = np.asarray(bins["count"], np.float64)
    keep = c > 0
    return float(np.sum(c[keep] / c.sum() * np.abs(np.asarray(bins["accuracy"])[keep]
                                                  - np.asarray(bins["confidence"])[keep])))


def plot_reliability(curves: Sequence[tuple], path: str, n_bins: int = 10, title: str = "") -> str:
    """Reliability diagram: accuracy vs confidence per bin, the diagonal for perfect
    calibration, each curve's ECE in the legend; saved to ``path``. A curve is
    ``(name, probs [n, C], labels [n])`` or ``(name, bins)`` (:func:`reliability`'s dict)."""
    from peft_jax.report import plot_lines

    lines = []
    for curve in curves:
        r = curve[1] if len(curve) == 2 else reliability(curve[1], curve[2], n_bins)
        keep = np.asarray(r["count"]) > 0
        lines.append((f"{curve[0]} (ECE {bins_ece(r):.3f})", np.asarray(r["confidence"])[keep],
                      np.asarray(r["accuracy"])[keep]))
    return plot_lines(lines, path, "confidence", "accuracy", title, unit_square=True,
                      figsize=(4.5, 4.5))
