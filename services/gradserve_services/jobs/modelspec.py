"""Turn a job's `model:` section into an engine model spec (docs/ARCHITECTURE.md), sized to the data.

The `mlp:` shorthand expands (`gradserve.builders.mlp`, the one MLP builder) to dense -> [layernorm] -> activation -> [dropout] per hidden layer and
a final dense `logits` layer as wide as the task's output. A graph (`nodes:` + `output:`) is taken
as written with `input_features` and `loss` filled in. Either way the engine's own spec parser
checks it here, before any training, and its errors are re-raised naming `model.nodes[NODE]`.

Data with categorical or bag columns feeds named inputs instead of the single `input`: `dense`
(float, the dense features, when there are any), `categorical` (ids, one column per categorical
field, when there are any) and a bag input per bag column, of its name; only a graph can read them,
and its tables must hold every row the ids reach.
"""

from __future__ import annotations

from gradserve.builders import mlp

from gradserve_services.errors import InvalidArgument, SpecError

from .job_keys import CATEGORICAL_INPUT, DENSE_INPUT
from .jobfile import ModelConfig

__all__ = ["build_spec", "check_spec", "named_inputs"]


def named_inputs(dense_features: int, fields: int, bags: tuple[str, ...] = ()) -> list[dict]:
    """The inputs of data with categorical ids or bags (see the module docstring)."""
    inputs = [{"name": DENSE_INPUT, "kind": "float", "features": dense_features}] if dense_features else []
    if fields:
        inputs.append({"name": CATEGORICAL_INPUT, "kind": "ids", "fields": fields})
    return inputs + [{"name": bag, "kind": "bag"} for bag in bags]


def build_spec(model: ModelConfig, *, input_features: int, output_width: int, loss: str,
               categorical_fields: int = 0, bags: tuple[str, ...] = (), table_rows: int = 0) -> dict:
    """The full spec for this data; raises `InvalidArgument` if the graph does not fit it."""
    if categorical_fields or bags:
        if model.mlp is not None:
            raise InvalidArgument("data with categorical or bag columns needs a graph (nodes: and output:) that "
                                  "looks its ids up in tables; the mlp shorthand reads one dense input",
                                  field="model.mlp")
        if "input_features" in model.graph:
            raise InvalidArgument("data with categorical or bag columns declares its inputs (dense, categorical, "
                                  "bags) itself", field="model.input_features")
        spec = {"inputs": named_inputs(input_features, categorical_fields, bags), "nodes": model.graph["nodes"],
                "output": model.graph["output"], "loss": loss}
        check_spec(spec, output_width)
        _check_table_rows(spec, table_rows, (CATEGORICAL_INPUT, *bags))
        return spec
    if model.mlp is not None:
        spec = mlp(input_features, outputs=output_width, loss=loss, **model.mlp)
    else:
        declared = model.graph.get("input_features", input_features)
        if declared != input_features:
            raise InvalidArgument(
                f"the data has {input_features} features but the graph declares {declared!r}",
                field="model.input_features",
            )
        spec = {"input_features": input_features, "nodes": model.graph["nodes"],
                "output": model.graph["output"], "loss": loss}
    check_spec(spec, output_width)
    return spec


def check_spec(spec: dict, output_width: int) -> None:
    """Run the engine's validation; the output node must be as wide as the labels need."""
    from gradserve_services.engine.spec import parse_spec

    try:
        graph = parse_spec(spec)
    except SpecError as failure:
        field = failure.field
        where = "model" if not field else (f"model.{field}" if field in ("input_features", "nodes", "output", "loss")
                                             else f"model.nodes[{field}]")
        raise InvalidArgument(failure.message, field=where) from None
    width = graph.widths[graph.output]
    if width != output_width:
        raise InvalidArgument(
            f"output node {graph.output!r} has {width} features but the data needs {output_width}",
            field="model.output",
        )


def _check_table_rows(spec: dict, table_rows: int, hashed: tuple[str, ...]) -> None:
    """Every table that reads hashed ids (the categorical input, a bag) must hold the rows they
    reach, [0, table_rows)."""
    for node in spec["nodes"]:
        if isinstance(node, dict) and node.get("op") in ("embedding", "embedding_bag") \
                and set(hashed) & set(node.get("inputs", ())):
            if node.get("rows", 0) < table_rows:
                raise InvalidArgument(
                    f"table {node.get('name')!r} has {node.get('rows')} rows but the ids it reads reach "
                    f"{table_rows - 1} (dataset.hash_rows / dataset.vocab rows)", field=f"model.nodes[{node.get('name')}]")
