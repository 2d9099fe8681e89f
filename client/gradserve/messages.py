"""Protobuf answers as plain Python data: the self-description RPCs' messages as dicts."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

__all__ = ["message_dict"]


def message_dict(message) -> dict:
    """Every field of `message` by its proto name (unset scalars as their defaults, unset optional
    fields as None), nested messages as dicts, repeated fields as lists, maps as dicts. 64-bit
    integers stay ints (protobuf's JSON mapping would make them strings)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif _repeated(field):
            out[field.name] = [_value(field, item) for item in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _repeated(field) -> bool:
    # `label` is gone from protobuf 7's descriptors; `is_repeated` is missing before 5.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _value(field, value):
    return message_dict(value) if field.message_type is not None else value
