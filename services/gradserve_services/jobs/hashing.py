"""The hashing trick: raw categorical values (strings or integers) to rows of a table.

A value's row is

    blake2b(f"{column}:{text}".encode("utf-8"), digest_size=8, key=seed as 8 little-endian bytes)
        read as a little-endian unsigned 64-bit integer, modulo `rows`

where `column` is the value's position in `dataset.categorical` (0, 1, ...), or for a value in a bag
(bags.py) its bag's position numbered on after them (`len(categorical)`, ...), and `text` is the value
as text: an integer's decimal digits (`7`, `-3`; a float column's whole numbers count as integers),
a string as written, stripped of surrounding blanks; a missing value is the empty text, a category of
its own. The same value in two columns lands on unrelated rows, so columns may share one table.

Why not Python's `hash()`: it is salted per process (PYTHONHASHSEED), so the rows would change
between runs and between the job and any process serving the trained tables. BLAKE2 is in every
Python's hashlib and fixed by RFC 7693; the result depends on nothing but (seed, column, text, rows).
Each distinct value is hashed once, so the cost follows the vocabulary, not the rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["hash_value", "hash_column", "value_text", "MAX_HASH_SEED"]

MAX_HASH_SEED = 2**64 - 1


def value_text(value) -> str:
    """The text a raw value is hashed as (see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if value != value:  # NaN: missing
            return ""
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def hash_value(value, rows: int, *, seed: int = 0, column: int = 0) -> int:
    """The row in [0, rows) of one raw value of categorical column `column`."""
    text = f"{column}:{value_text(value)}".encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=8, key=int(seed).to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") % rows


def hash_column(values, rows: int, *, seed: int = 0, column: int = 0) -> np.ndarray:
    """int64 rows of a column of raw values (any 1-D array or sequence), hashing each distinct value
    once."""
    values = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if values.dtype.kind == "O":
        texts = np.array([value_text(value) for value in values], dtype=object)
    elif values.dtype.kind == "f":
        texts = np.array([value_text(value) for value in values.tolist()], dtype=object)
    else:
        texts = values  # integers, booleans and fixed-width strings: np.unique works on them as they are
    distinct, position = np.unique(texts, return_inverse=True)
    rows_of_distinct = np.fromiter((hash_value(value, rows, seed=seed, column=column) for value in distinct.tolist()),
                                   dtype=np.int64, count=len(distinct))
    return rows_of_distinct[position.reshape(-1)]
