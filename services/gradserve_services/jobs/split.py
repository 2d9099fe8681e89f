"""Train/test split, feature standardisation, and the order batches are drawn in.

The batch order is a pure function of (seed, global step): epoch `e` uses the permutation drawn from
`default_rng([seed, e])`, and step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`.
So a resumed job needs only the step it stopped at to continue with exactly the batches an
uninterrupted job would have drawn: no batch repeated, none skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .bags import BagColumn
from .datasets import CATEGORICAL_INPUT, DENSE_INPUT, Dataset

__all__ = ["Split", "Standardizer", "BatchOrder", "split_dataset"]


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_scaler: "Standardizer | None"
    target_scaler: "Standardizer | None"  # regression targets; losses are reported in scaled units
    ids_train: np.ndarray | None = None  # categorical ids, split with the same rows
    ids_test: np.ndarray | None = None
    click_probability_test: np.ndarray | None = None  # synthetic_ctr: the planted model's, test rows
    bags_train: dict[str, BagColumn] | None = None  # bag columns (by input name), split with the same rows
    bags_test: dict[str, BagColumn] | None = None

    def train_inputs(self, rows) -> "np.ndarray | dict[str, np.ndarray]":
        """The model's batch of training rows `rows`: the features, or with categorical ids or bags
        the named inputs (`dense`, `categorical`, each bag's `NAME.values` and `NAME.offsets`)."""
        return _inputs(self.x_train, self.ids_train, self.bags_train, rows)

    def test_inputs(self) -> "np.ndarray | dict[str, np.ndarray]":
        return _inputs(self.x_test, self.ids_test, self.bags_test, slice(None))


def _inputs(x, ids, bags, rows):
    if ids is None and not bags:
        return x[rows]
    named = {DENSE_INPUT: x[rows]} if x.shape[1] else {}
    if ids is not None:
        named[CATEGORICAL_INPUT] = ids[rows]
    for name, bag in (bags or {}).items():
        named.update(bag.take(rows).tensors(name))
    return named


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "Standardizer":
        values = np.asarray(values, dtype=np.float64)
        scale = values.std(axis=0)
        # Constant columns (digits' always-blank corner pixels) keep scale 1 instead of dividing by 0.
        scale = np.where(scale > 1e-12, scale, 1.0)
        return cls(mean=values.mean(axis=0), scale=scale)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return (values * self.scale + self.mean).astype(np.float32)


def split_dataset(
    dataset: Dataset, *, test_fraction: float, seed: int, standardize: bool, standardize_target: bool
) -> Split:
    """A seeded split (stratified by class where every class has two samples); scalers fitted on
    the training part only, so no test statistics leak into training."""
    from sklearn.model_selection import train_test_split

    stratify = None
    if dataset.task == "classification":
        counts = np.bincount(dataset.y)
        classes = int((counts > 0).sum())
        test_rows = math.ceil(test_fraction * len(dataset.y))  # as scikit-learn counts them
        # stratifying needs two of each class and room for every class on both sides
        if counts[counts > 0].min() >= 2 and min(test_rows, len(dataset.y) - test_rows) >= classes:
            stratify = dataset.y
    rows_train, rows_test = train_test_split(
        np.arange(len(dataset.x)), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    x_train, x_test, y_train, y_test = dataset.x[rows_train], dataset.x[rows_test], dataset.y[rows_train], dataset.y[rows_test]
    feature_scaler = Standardizer.fit(x_train) if standardize else None
    if feature_scaler is not None:
        x_train, x_test = feature_scaler.transform(x_train), feature_scaler.transform(x_test)
    target_scaler = None
    if dataset.task == "regression" and standardize_target:
        target_scaler = Standardizer.fit(y_train)
        y_train, y_test = target_scaler.transform(y_train), target_scaler.transform(y_test)
    return Split(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.ascontiguousarray(y_test),
        feature_scaler=feature_scaler,
        target_scaler=target_scaler,
        ids_train=None if dataset.ids is None else np.ascontiguousarray(dataset.ids[rows_train]),
        ids_test=None if dataset.ids is None else np.ascontiguousarray(dataset.ids[rows_test]),
        click_probability_test=None if dataset.click_probability is None else dataset.click_probability[rows_test],
        bags_train={name: bag.take(rows_train) for name, bag in dataset.bags.items()},
        bags_test={name: bag.take(rows_test) for name, bag in dataset.bags.items()},
    )


@dataclass(frozen=True)
class BatchOrder:
    """Which training rows make up global step `step`. The last batch of an epoch may be smaller."""

    num_samples: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
        """Row indices of step `step`; pass the epoch's permutation to avoid redrawing it."""
        if permutation is None:
            permutation = self.permutation(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.batch_size
        return permutation[start : start + self.batch_size]

    def position(self, step: int) -> dict:
        """The data-order position before `step` runs, as recorded in checkpoints."""
        return {
            "step": step,
            "epoch": self.epoch_of(step),
            "batch_in_epoch": step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }
