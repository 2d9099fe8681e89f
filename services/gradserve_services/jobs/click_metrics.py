"""Figures of a click model on held-out rows: log-loss and ROC AUC, from logits and 0/1 clicks."""

from __future__ import annotations

import numpy as np

__all__ = ["log_loss", "roc_auc"]


def log_loss(clicks: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits against 0/1 clicks, in the stable form."""
    clicks, logits = np.ravel(clicks).astype(np.float64), np.ravel(logits).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, logits) - clicks * logits))


def roc_auc(clicks: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random click scores above a random non-click (ties
    count half), from the rank sum (Mann-Whitney U). NaN when only one class is present."""
    clicks, scores = np.ravel(clicks) > 0.5, np.ravel(scores).astype(np.float64)
    positives, negatives = int(clicks.sum()), int((~clicks).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank over each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    average = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks[order] = np.repeat(average, ends - starts)
    u = ranks[clicks].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))
