"""Dropout masks from a counter-based hash: a pure function of (seed, node, global sample, feature).

No random state is carried between calls, so a shard or micro-batch that starts at global sample
`first_sample` draws exactly the bits the full batch would draw for those rows: sharding and
micro-batching never change the mask. The hash is SplitMix64 (Steele, Lea, Flood 2014) evaluated on
`key + counter * golden_gamma` with uint64 arithmetic that wraps, computed by the array namespace.
"""

from __future__ import annotations

import hashlib

__all__ = ["dropout_mask"]

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB


def stream_key(seed: int, node_name: str) -> int:
    """A 64-bit key per (seed, node); blake2b because Python's hash() is salted per process."""
    digest = hashlib.blake2b(f"{seed}\x00{node_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix64(xp, state):
    """The SplitMix64 finalizer, in place on a uint64 array."""
    state ^= state >> 30
    state *= xp.uint64(MIX_1)
    state ^= state >> 27
    state *= xp.uint64(MIX_2)
    state ^= state >> 31
    return state


def dropout_mask(xp, seed: int, node_name: str, first_sample: int, shape, rate: float, dtype, out):
    """Write into `out` (shape (rows, width)) 0 for dropped and 1 / (1 - rate) for kept features."""
    rows, width = shape
    samples = xp.arange(first_sample, first_sample + rows, dtype=xp.uint64)[:, None]
    features = xp.arange(width, dtype=xp.uint64)[None, :]
    counter = samples * xp.uint64(width) + features  # unique per (sample, feature) within a node
    state = xp.uint64(stream_key(seed, node_name)) + counter * xp.uint64(GOLDEN_GAMMA)
    bits = splitmix64(xp, state)
    # Kept when the 64 uniform bits reach rate * 2**64: probability exactly 1 - rate up to 2**-64.
    threshold = min(int(rate * 2.0**64), 2**64 - 1)
    keep = bits >= xp.uint64(threshold)
    return xp.multiply(keep, 1.0 / (1.0 - rate), out=out, dtype=dtype)
