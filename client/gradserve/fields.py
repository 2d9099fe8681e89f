"""Request messages built from the SDK's arguments, one field at a time, so that a value the field
cannot hold (a negative or too large integer, a float or string where an integer goes) raises the
SDK's `InvalidArgument` naming that field instead of protobuf's bare ValueError or TypeError."""

from __future__ import annotations

import operator

from google.protobuf.descriptor import FieldDescriptor

from .errors import InvalidArgument

__all__ = ["build", "INTEGER_RANGES"]

_UNSIGNED_64 = (0, 2**64 - 1)
_SIGNED_64 = (-(2**63), 2**63 - 1)
_UNSIGNED_32 = (0, 2**32 - 1)
_SIGNED_32 = (-(2**31), 2**31 - 1)

# Protobuf integer field type -> (lowest, highest) value it holds.
INTEGER_RANGES = {
    FieldDescriptor.TYPE_UINT64: _UNSIGNED_64,
    FieldDescriptor.TYPE_FIXED64: _UNSIGNED_64,
    FieldDescriptor.TYPE_INT64: _SIGNED_64,
    FieldDescriptor.TYPE_SINT64: _SIGNED_64,
    FieldDescriptor.TYPE_SFIXED64: _SIGNED_64,
    FieldDescriptor.TYPE_UINT32: _UNSIGNED_32,
    FieldDescriptor.TYPE_FIXED32: _UNSIGNED_32,
    FieldDescriptor.TYPE_INT32: _SIGNED_32,
    FieldDescriptor.TYPE_SINT32: _SIGNED_32,
    FieldDescriptor.TYPE_SFIXED32: _SIGNED_32,
}


def build(message_class, **values):
    """`message_class(**values)`, every value checked against its field first."""
    message = message_class()
    fields = message_class.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        field = fields[name]
        if _repeated(field):
            _fill(lambda: getattr(message, name).extend(value), name, value)
        elif field.message_type is not None:
            _fill(lambda: getattr(message, name).CopyFrom(value), name, value)
        else:
            bounds = INTEGER_RANGES.get(field.type)
            if bounds is not None:
                value = _integer(value, name, bounds)
            _fill(lambda: setattr(message, name, value), name, value)
    return message


def _repeated(field) -> bool:
    # `is_repeated` replaces `label` in newer protobuf releases; older ones the pin allows lack it
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _integer(value, name: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if isinstance(value, bool):  # an int to Python, never meant as a count or an id
        raise _invalid(name, f"must be an integer, got {value!r}")
    try:
        number = operator.index(value)  # int and numpy integers; not floats or strings
    except TypeError:
        raise _invalid(name, f"must be an integer, got {type(value).__name__} {value!r}") from None
    if not low <= number <= high:
        raise _invalid(name, f"{number} is outside [{low}, {high}]")
    return number


def _fill(assign, name: str, value) -> None:
    try:
        assign()
    except (TypeError, ValueError) as bad:
        raise _invalid(name, f"cannot hold {type(value).__name__} {value!r} ({bad})") from None


def _invalid(name: str, description: str) -> InvalidArgument:
    return InvalidArgument.described(f"{name}: {description}", ((name, description),))
