"""Small typed readers of job-file values: each checks one value and names its dotted key in the
InvalidArgument it raises."""

from __future__ import annotations

import math
from collections.abc import Mapping

from gradserve_services.errors import InvalidArgument

__all__ = ["section", "reject_unknown", "choice", "integer", "number", "boolean", "string", "optional_string"]


def section(raw: Mapping, key: str, *, required: bool = False) -> Mapping:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidArgument("missing section", field=key)
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be a mapping, got {type(value).__name__}", field=key)
    return value


def reject_unknown(raw: Mapping, known: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in known:
            field = f"{prefix}.{key}" if prefix else str(key)
            raise InvalidArgument(f"unknown key; known keys here: {', '.join(known)}", field=field)


def choice(value, choices, field: str, *, what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"unknown {what} {value!r}; known: {', '.join(choices)}", field=field)


def integer(value, field: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"must be an integer >= {minimum}, got {value!r}", field=field)
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"must be an integer <= {maximum}, got {value!r}", field=field)
    return value


def number(value, field: str) -> float:
    if isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string under YAML 1.1; accept what float() accepts.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field=field)
    return float(value)


def boolean(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"must be true or false, got {value!r}", field=field)
    return value


def string(value, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"must be a non-empty string, got {value!r}", field=field)
    return value


def optional_string(value, field: str) -> str | None:
    return None if value is None else string(value, field)
