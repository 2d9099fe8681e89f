"""The modules behind `gradserve`'s subcommands and bench suites, where an install may lack some:
each is imported when the parser is built, and one that is not there is left out of it."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable, Iterator

__all__ = ["present_modules"]


def present_modules(package: str, names: Iterable[str]) -> Iterator[tuple[str, ModuleType]]:
    """`(name, module)` for each `package.name` this install has, in the order of `names`. A module
    that is not there is skipped; one that is there but fails to import (a module it needs is
    missing) raises, rather than vanishing from the command line."""
    for name in names:
        qualified = f"{package}.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as missing:
            if missing.name != qualified:
                raise
            continue
        yield name, module
