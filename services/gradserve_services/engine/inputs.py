"""The batch inputs a spec declares: their kinds, widths and the tensors that carry them.

A spec either gives `input_features` (one float input named "input", carried as the tensor `x`) or
declares named inputs under `inputs`, each of one kind:

- `float` {features}: float features, shape (batch, features), in the parameters' dtype;
- `ids` {fields}: categorical ids, int64 of shape (batch, fields), read by `embedding`;
- `bag` {weighted=false}: a multi-hot bag of ids per row, as torch's `EmbeddingBag` takes it:
  `NAME.values` (int64, every row's ids one after another), `NAME.offsets` (int64, (batch,), where
  each row's ids start) and, when weighted, `NAME.weights` (float, one per value); read by
  `embedding_bag`.

Each tensor travels as `batch.<tensor>`, and errors about it name that field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gradserve_services.errors import SpecError

__all__ = ["INPUT", "FLOAT", "IDS", "BAG", "INPUT_KINDS", "MAX_INPUTS", "InputDecl", "parse_inputs", "single_input"]

INPUT = "input"  # the reserved name of the single batch input of an `input_features` spec
FLOAT, IDS, BAG = "float", "ids", "bag"
INPUT_KINDS = (FLOAT, IDS, BAG)
MAX_INPUTS = 1024
MAX_NAME_LENGTH = 256
_KIND_KEYS = {FLOAT: {"features"}, IDS: {"fields"}, BAG: {"weighted"}}


@dataclass(frozen=True)
class InputDecl:
    name: str
    kind: str  # one of INPUT_KINDS
    width: int | None  # features (float), fields (ids); a bag has none
    weighted: bool = False  # bags only: per-value weights come with the ids
    tensor: str = ""  # the tensor of a float or ids input (`x` for the single input)

    def tensor_names(self) -> tuple[str, ...]:
        """The batch tensors that carry this input."""
        if self.kind != BAG:
            return (self.tensor,)
        parts = ("values", "offsets", "weights") if self.weighted else ("values", "offsets")
        return tuple(f"{self.name}.{part}" for part in parts)


def single_input(input_features: int) -> dict[str, InputDecl]:
    return {INPUT: InputDecl(INPUT, FLOAT, input_features, tensor="x")}


def parse_inputs(raw_inputs, max_width: int) -> dict[str, InputDecl]:
    """The declared inputs in order; SpecError names the input (or `inputs[i]`) at fault."""
    if not isinstance(raw_inputs, (list, tuple)) or not raw_inputs:
        raise SpecError("inputs must be a non-empty list", field="inputs")
    if len(raw_inputs) > MAX_INPUTS:
        raise SpecError(f"{len(raw_inputs)} inputs; at most {MAX_INPUTS} are allowed", field="inputs")
    declared: dict[str, InputDecl] = {}
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, Mapping):
            raise SpecError(f"input {index} is not a mapping", field=f"inputs[{index}]")
        name = raw.get("name")
        # A dot would make a bag's tensor names ambiguous (NAME.values).
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or "." in name:
            raise SpecError(
                f"input {index} needs a name of 1..{MAX_NAME_LENGTH} characters without '.'", field=f"inputs[{index}]"
            )
        if name == INPUT:
            raise SpecError(f"{INPUT!r} is reserved for the single input of an input_features spec", field=name)
        if name in declared:
            raise SpecError(f"input name {name!r} is used twice", field=name)
        declared[name] = _parse_input(name, raw, max_width)
    return declared


def _parse_input(name: str, raw: Mapping, max_width: int) -> InputDecl:
    kind = raw.get("kind")
    if kind not in INPUT_KINDS:
        raise SpecError(f"unknown input kind {kind!r}; known: {', '.join(INPUT_KINDS)}", field=name)
    unknown = sorted(set(raw) - {"name", "kind"} - _KIND_KEYS[kind])
    if unknown:
        raise SpecError(f"a {kind} input has no key {unknown[0]!r}", field=name)
    if kind == BAG:
        weighted = raw.get("weighted", False)
        if not isinstance(weighted, bool):
            raise SpecError(f"weighted must be a bool, got {weighted!r}", field=name)
        return InputDecl(name, BAG, None, weighted=weighted)
    (key,) = _KIND_KEYS[kind]
    width = raw.get(key)
    if isinstance(width, bool) or not isinstance(width, int):
        raise SpecError(f"{key} must be an integer, got {width!r}", field=name)
    if not 1 <= width <= max_width:
        raise SpecError(f"{key} = {width} is outside [1, {max_width}]", field=name)
    return InputDecl(name, kind, width, tensor=name)
