"""A synthetic click-through dataset whose clicks come from a planted model, so the best log-loss
any model can reach on it is known.

Each sample has `dense` float features (standard normal) and `fields` categorical ids. Field f's ids
follow a Zipf law over `vocab` values (rank k drawn with probability proportional to
(k + 1)^-zipf), the ranks shuffled per field so the most frequent id is not always 0. The planted
model scores a sample

    logit = bias + dense . w + sum_f t_f[id_f] + sum_{f < g} <e_f[id_f], e_g[id_g]>

(a weight per dense feature, a scalar effect per id, and a low-rank vector per id whose pairwise dot
products make the fields interact, as DLRM's dot interaction models them), and the click is drawn
from Bernoulli(sigmoid(logit)). `click_probability` is kept beside the data: its log-loss on the
held-out rows is the floor a trained model is measured against (the Bayes risk, up to the sampling
of the held-out clicks themselves).

Everything is a pure function of (seed, sizes): the same seed gives the same data in any process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticCtr", "PlantedModel", "make_synthetic_ctr", "DEFAULT_SAMPLES", "DEFAULT_FIELDS", "DEFAULT_DENSE", "DEFAULT_VOCAB", "DEFAULT_ZIPF"]

DEFAULT_SAMPLES = 200_000
DEFAULT_FIELDS = 26  # Criteo's layout: 26 categorical fields, 13 dense features
DEFAULT_DENSE = 13
DEFAULT_VOCAB = 1000
DEFAULT_ZIPF = 1.5
INTERACTION_DIM = 2  # of the planted per-id vectors
BASE_CLICK_RATE = 0.25  # roughly Criteo's; the bias is set so the mean logit sits at its log-odds
DENSE_SCALE = 1.0  # std of the dense part of the logit
FIELD_SCALE = 0.4  # std of the sum of the per-id effects over the fields
INTERACTION_SCALE = 0.25  # std of the sum of the pairwise products
_STREAM = 0x0C7E  # separates this generator's random stream from the job's other uses of the seed


@dataclass(frozen=True)
class PlantedModel:
    bias: float
    dense_weight: np.ndarray  # (dense,)
    id_effect: np.ndarray  # (fields, vocab)
    id_vector: np.ndarray  # (fields, vocab, INTERACTION_DIM)

    def logits(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        fields = np.arange(ids.shape[1])
        vectors = self.id_vector[fields, ids]  # (n, fields, k)
        total = vectors.sum(axis=1)
        # sum over f < g of <v_f, v_g> = (|sum v|^2 - sum |v|^2) / 2
        pairwise = 0.5 * (np.einsum("nk,nk->n", total, total) - np.einsum("nfk,nfk->n", vectors, vectors))
        return self.bias + dense @ self.dense_weight + self.id_effect[fields, ids].sum(axis=1) + pairwise


@dataclass(frozen=True)
class SyntheticCtr:
    dense: np.ndarray  # float64 (n, dense)
    ids: np.ndarray  # int64 (n, fields), each in [0, vocab)
    clicks: np.ndarray  # float64 (n,), 0 or 1
    click_probability: np.ndarray  # float64 (n,): the planted model's
    model: PlantedModel


def make_synthetic_ctr(samples: int = DEFAULT_SAMPLES, *, seed: int = 0, fields: int = DEFAULT_FIELDS,
                       dense: int = DEFAULT_DENSE, vocab: int = DEFAULT_VOCAB,
                       zipf: float = DEFAULT_ZIPF) -> SyntheticCtr:
    rng = np.random.default_rng([seed, _STREAM])
    # the model and each field's rank -> id order first: they do not depend on the sample count
    model = _planted_model(rng, fields, dense, vocab, zipf)
    id_of_rank = np.argsort(rng.random((fields, vocab)), axis=1)
    dense_values = rng.standard_normal((samples, dense))
    ids = _zipf_ids(rng, samples, vocab, zipf, id_of_rank)
    probability = _sigmoid(model.logits(dense_values, ids))
    clicks = (rng.random(samples) < probability).astype(np.float64)
    return SyntheticCtr(dense_values, ids, clicks, probability, model)


def _zipf_probabilities(vocab: int, zipf: float) -> np.ndarray:
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -zipf
    return weights / weights.sum()


def _zipf_ids(rng, samples: int, vocab: int, zipf: float, id_of_rank: np.ndarray) -> np.ndarray:
    fields = id_of_rank.shape[0]
    cumulative = np.cumsum(_zipf_probabilities(vocab, zipf))
    ranks = np.minimum(np.searchsorted(cumulative, rng.random((samples, fields))), vocab - 1)
    return id_of_rank[np.arange(fields), ranks].astype(np.int64)


def _planted_model(rng, fields: int, dense: int, vocab: int, zipf: float) -> PlantedModel:
    """Parameters scaled so each part of the logit has the std named above under the Zipf law (a
    sum over F fields of per-id terms of variance s^2 has variance F s^2; the pairwise part has
    F(F-1)/2 products of two k-vectors, each product of variance k s^4)."""
    dense_weight = rng.standard_normal(dense) * (DENSE_SCALE / np.sqrt(dense))
    id_effect = rng.standard_normal((fields, vocab)) * (FIELD_SCALE / np.sqrt(fields))
    pairs = max(fields * (fields - 1) / 2, 1.0)
    vector_std = (INTERACTION_SCALE**2 / (pairs * INTERACTION_DIM)) ** 0.25
    id_vector = rng.standard_normal((fields, vocab, INTERACTION_DIM)) * vector_std
    bias = float(np.log(BASE_CLICK_RATE / (1 - BASE_CLICK_RATE)))
    return PlantedModel(bias, dense_weight, id_effect, id_vector)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))
