"""Turn a job's `model:` section into an engine model spec (docs/ARCHITECTURE.md), sized to the data.

The `mlp:` shorthand expands to dense -> [layernorm] -> activation -> [dropout] per hidden layer and
a final dense `logits` layer as wide as the task's output. A graph (`nodes:` + `output:`) is taken
as written with `input_features` and `loss` filled in. Either way the engine's own spec parser
checks it here, before any training, and its errors are re-raised naming `model.nodes[NODE]`.
"""

from __future__ import annotations

from gradserve_services.errors import InvalidArgument, SpecError

from .jobfile import ModelConfig

__all__ = ["build_spec", "mlp_spec", "check_spec"]


def build_spec(model: ModelConfig, *, input_features: int, output_width: int, loss: str) -> dict:
    """The full spec for this data; raises `InvalidArgument` if the graph does not fit it."""
    if model.mlp is not None:
        spec = mlp_spec(input_features, output_width, loss=loss, **model.mlp)
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


def mlp_spec(
    input_features: int,
    output_width: int,
    *,
    hidden: list[int],
    activation: str = "relu",
    dropout: float = 0.0,
    layernorm: bool = False,
    loss: str = "softmax_cross_entropy",
) -> dict:
    nodes = []
    previous = "input"
    for layer, units in enumerate(hidden, start=1):
        nodes.append({"name": f"fc{layer}", "op": "dense", "inputs": [previous], "units": units})
        previous = f"fc{layer}"
        if layernorm:
            nodes.append({"name": f"norm{layer}", "op": "layernorm", "inputs": [previous]})
            previous = f"norm{layer}"
        nodes.append({"name": f"act{layer}", "op": activation, "inputs": [previous]})
        previous = f"act{layer}"
        if dropout > 0:
            nodes.append({"name": f"drop{layer}", "op": "dropout", "inputs": [previous], "rate": dropout})
            previous = f"drop{layer}"
    nodes.append({"name": "logits", "op": "dense", "inputs": [previous], "units": output_width})
    return {"input_features": input_features, "nodes": nodes, "output": "logits", "loss": loss}


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
