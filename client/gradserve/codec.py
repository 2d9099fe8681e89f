"""The one tensor codec: numpy array <-> `gradserve.v1.Tensor` (dtype, shape, raw bytes).

Both ends use it: the SDK to send and read tensors, the service to read and send them. Decoding
checks everything a hostile or buggy peer could get wrong (unknown dtype, negative or absurd dims,
byte length) before touching the bytes, and then wraps them with `np.frombuffer`: no copy.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.v1 import tensor_pb2

__all__ = [
    "DTYPES",
    "MAX_RANK",
    "TensorFormatError",
    "TensorTooLarge",
    "encode_tensor",
    "decode_tensor",
    "tensor_nbytes",
    "wire_array",
]

# Wire dtype name -> little-endian numpy dtype. Floats for parameters/inputs/targets, ints for labels.
DTYPES = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}
MAX_RANK = 8  # the engine uses rank <= 2; a few more dims cost nothing to allow


class TensorFormatError(ValueError):
    """A tensor message is malformed. `field` names the tensor (e.g. "batch.x")."""

    def __init__(self, message: str, field: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


class TensorTooLarge(TensorFormatError):
    """A tensor claims more bytes than the receiver accepts."""


def wire_array(array) -> np.ndarray:
    """`array` as a C-contiguous little-endian array of a wire dtype (no copy when it already is)."""
    array = np.asarray(array)
    wire_dtype = DTYPES.get(array.dtype.name)
    if wire_dtype is None:
        raise TensorFormatError(
            f"dtype {array.dtype} cannot be sent; use one of {', '.join(DTYPES)}", field=""
        )
    return np.asarray(array, dtype=wire_dtype, order="C")  # keeps 0-d arrays 0-d


def encode_tensor(array, *, include_data: bool = True) -> tensor_pb2.Tensor:
    """A Tensor message for `array`; with `include_data=False` only dtype and shape (chunked)."""
    array = wire_array(array)
    message = tensor_pb2.Tensor(dtype=array.dtype.name, shape=array.shape)
    if include_data:
        message.data = array.tobytes()
    return message


def tensor_nbytes(message: tensor_pb2.Tensor, field: str, max_bytes: int) -> tuple[np.dtype, tuple, int]:
    """Check dtype and shape of `message` and return (dtype, shape, byte size), without reading data.

    The byte size is computed with Python integers, so no dims can overflow it; anything above
    `max_bytes` raises TensorTooLarge before a buffer of that size could be requested.
    """
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorFormatError(
            f"unknown dtype {message.dtype!r}; use one of {', '.join(DTYPES)}", field=field
        )
    shape = tuple(message.shape)
    if len(shape) > MAX_RANK:
        raise TensorFormatError(f"rank {len(shape)} exceeds {MAX_RANK}", field=field)
    for dim in shape:
        if dim < 0:
            raise TensorFormatError(f"negative dimension in shape {list(shape)}", field=field)
    # An empty tensor's other dimensions still size numpy's view of it: bounded like the bytes.
    spanned = math.prod(dim for dim in shape if dim) * dtype.itemsize
    if 0 in shape and spanned > max_bytes:
        raise TensorFormatError(
            f"shape {list(shape)} is empty, but its other dimensions span {spanned} bytes; at most "
            f"{max_bytes} are accepted", field=field)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise TensorTooLarge(
            f"shape {list(shape)} of {message.dtype} is {nbytes} bytes; at most {max_bytes} are accepted",
            field=field,
        )
    return dtype, shape, nbytes


def decode_tensor(message: tensor_pb2.Tensor, field: str, max_bytes: int = 1 << 33) -> np.ndarray:
    """The array a Tensor message holds (read-only, sharing the message's bytes)."""
    dtype, shape, nbytes = tensor_nbytes(message, field, max_bytes)
    data = message.data
    if len(data) != nbytes:
        raise TensorFormatError(
            f"holds {len(data)} bytes but shape {list(shape)} of {message.dtype} needs {nbytes}",
            field=field,
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
