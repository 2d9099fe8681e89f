"""Gradient encodings between workers and parameter servers: dense, fp16, int8 (one scale per
tensor), top-k with error feedback.

A worker encodes its gradient SUM for one parameter-server shard into a `part` dict; the server
decodes it back to a gradient sum. Compressed encodings carry the shard MEAN (sum / count), which
keeps float16 in range and the top-k residual independent of shard size, and multiply back.
int8 maps each tensor's largest magnitude to 127 (round to nearest): a quarter of float32's bytes,
an error of at most half a step, scale / 2, per element.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["encode", "decode", "ErrorFeedback"]


class ErrorFeedback:
    """Per-parameter residuals of top-k: what was not sent is added to the next gradient."""

    def __init__(self):
        self.residuals: dict[str, np.ndarray] = {}


def encode(grad_sum: Mapping[str, np.ndarray], names, count: int, kind: str, *,
           feedback: ErrorFeedback | None = None, topk_fraction: float = 0.01):
    """`(part, bytes_raw, bytes_sent)` for the parameters `names` of one gradient sum."""
    raw = sum(grad_sum[name].nbytes for name in names)
    if kind == "none":
        grads = {name: grad_sum[name] for name in names}
        return {"kind": "dense", "grads": grads}, raw, raw
    if kind == "fp16":
        grads = {name: (grad_sum[name] / count).astype(np.float16) for name in names}
        dtype = next(iter(grad_sum.values())).dtype.name
        part = {"kind": "fp16", "count": count, "dtype": dtype, "grads": grads}
        return part, raw, sum(g.nbytes for g in grads.values())
    if kind == "int8":
        grads = {name: _int8(grad_sum[name], count) for name in names}
        dtype = next(iter(grad_sum.values())).dtype.name
        part = {"kind": "int8", "count": count, "dtype": dtype, "grads": grads}
        return part, raw, sum(q.nbytes + 8 for q, _ in grads.values())
    if kind == "topk":
        feedback = feedback if feedback is not None else ErrorFeedback()
        grads, sent = {}, 0
        for name in names:
            grads[name] = _top_k(grad_sum[name], count, name, feedback, topk_fraction)
            sent += grads[name][0].nbytes + grads[name][1].nbytes
        dtype = next(iter(grad_sum.values())).dtype.name
        return {"kind": "topk", "count": count, "dtype": dtype, "grads": grads}, raw, sent
    raise ValueError(f"unknown compression {kind!r}")


def _int8(grad_sum, count):
    """`(int8 values, scale)` of the shard mean; a tensor of zeros gets scale 0."""
    mean = grad_sum / count
    largest = float(np.max(np.abs(mean))) if mean.size else 0.0
    scale = largest / 127.0
    if scale == 0.0 or not math.isfinite(scale):
        return np.zeros(mean.shape, np.int8), 0.0
    return np.rint(mean / scale).astype(np.int8), scale


def _top_k(grad_sum, count, name, feedback: ErrorFeedback, fraction):
    corrected = grad_sum.reshape(-1) / count
    residual = feedback.residuals.get(name)
    if residual is not None and residual.shape == corrected.shape:
        corrected += residual
    keep = max(1, math.ceil(fraction * corrected.size))
    if keep >= corrected.size:
        indices = np.arange(corrected.size, dtype=np.int64)
    else:
        indices = np.argpartition(np.abs(corrected), corrected.size - keep)[corrected.size - keep:]
    index_dtype = np.int32 if corrected.size < 2**31 else np.int64
    indices = np.sort(indices).astype(index_dtype)
    values = corrected[indices]
    corrected[indices] = 0.0  # what was sent leaves the residual
    feedback.residuals[name] = corrected
    return indices, values, tuple(grad_sum.shape)


def decode(part: Mapping) -> dict[str, np.ndarray]:
    """The gradient SUM a part stands for (dense parts are returned as they came, not copied)."""
    kind = part["kind"]
    if kind == "dense":
        return part["grads"]
    count, dtype = part["count"], np.dtype(part["dtype"])
    if kind == "fp16":
        return {name: g.astype(dtype) * dtype.type(count) for name, g in part["grads"].items()}
    if kind == "int8":
        return {name: q.astype(dtype) * dtype.type(scale * count)
                for name, (q, scale) in part["grads"].items()}
    grads = {}
    for name, (indices, values, shape) in part["grads"].items():
        dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
        dense[indices] = values * count
        grads[name] = dense.reshape(shape)
    return grads
