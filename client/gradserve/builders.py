"""Builders for model specs (the JSON-able dict of docs/ARCHITECTURE.md): `mlp(...)` and a small
fluent `GraphBuilder` for graphs with fan-out (residual connections, concatenations)."""

from __future__ import annotations

__all__ = ["INPUT", "mlp", "GraphBuilder"]

INPUT = "input"  # the reserved name of the batch input


def mlp(
    input_features: int,
    hidden: list[int] | tuple[int, ...],
    outputs: int,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
    dropout: float = 0.0,
    layernorm: bool = False,
) -> dict:
    """dense -> [layernorm] -> activation -> [dropout] per hidden width, then a dense "logits"."""
    graph = GraphBuilder(input_features, loss=loss)
    previous = INPUT
    for layer, units in enumerate(hidden, start=1):
        previous = graph.dense(previous, units, name=f"fc{layer}")
        if layernorm:
            previous = graph.layernorm(previous, name=f"norm{layer}")
        previous = graph.activation(activation, previous, name=f"act{layer}")
        if dropout:
            previous = graph.dropout(previous, dropout, name=f"drop{layer}")
    return graph.build(graph.dense(previous, outputs, name="logits"))


class GraphBuilder:
    """Add nodes one call at a time; each call returns the new node's name to feed later nodes.

    >>> g = GraphBuilder(4, loss="mse")
    >>> h = g.relu(g.dense("input", 8))
    >>> spec = g.build(g.dense(g.add(h, g.dense(h, 8)), 1))
    """

    def __init__(self, input_features: int, *, loss: str = "softmax_cross_entropy"):
        self.input_features = input_features
        self.loss = loss
        self.nodes: list[dict] = []

    def node(self, op: str, inputs: list[str] | tuple[str, ...], *, name: str | None = None, **attributes) -> str:
        name = name or f"{op}{len(self.nodes) + 1}"
        self.nodes.append({"name": name, "op": op, "inputs": list(inputs), **attributes})
        return name

    def dense(self, source: str, units: int, *, bias: bool = True, name: str | None = None) -> str:
        attributes = {"units": units} if bias else {"units": units, "bias": False}
        return self.node("dense", [source], name=name, **attributes)

    def activation(self, op: str, source: str, *, name: str | None = None) -> str:
        return self.node(op, [source], name=name)

    def relu(self, source: str, *, name: str | None = None) -> str:
        return self.node("relu", [source], name=name)

    def leaky_relu(self, source: str, alpha: float = 0.01, *, name: str | None = None) -> str:
        return self.node("leaky_relu", [source], name=name, alpha=alpha)

    def sigmoid(self, source: str, *, name: str | None = None) -> str:
        return self.node("sigmoid", [source], name=name)

    def tanh(self, source: str, *, name: str | None = None) -> str:
        return self.node("tanh", [source], name=name)

    def gelu(self, source: str, *, name: str | None = None) -> str:
        return self.node("gelu", [source], name=name)

    def add(self, *sources: str, name: str | None = None) -> str:
        return self.node("add", sources, name=name)

    def concat(self, *sources: str, name: str | None = None) -> str:
        return self.node("concat", sources, name=name)

    def layernorm(self, source: str, eps: float | None = None, *, name: str | None = None) -> str:
        attributes = {} if eps is None else {"eps": eps}
        return self.node("layernorm", [source], name=name, **attributes)

    def dropout(self, source: str, rate: float, *, name: str | None = None) -> str:
        return self.node("dropout", [source], name=name, rate=rate)

    def build(self, output: str) -> dict:
        """The spec dict with `output` as the node the loss is taken of."""
        return {
            "input_features": self.input_features,
            "nodes": [dict(node) for node in self.nodes],
            "output": output,
            "loss": self.loss,
        }
