"""gradserve's autodiff engine: numpy (or any numpy-like array namespace `xp`), no I/O.

A model is data (a spec, see docs/ARCHITECTURE.md); `Model` validates it and computes the loss and
its gradient by reverse mode (one backward pass, micro-batch accumulation) or a directional
derivative by forward mode (`jvp`).
"""

from __future__ import annotations

from .gradcheck import GradcheckReport, gradcheck, numerical_gradient
from .losses import LOSSES, Loss
from .model import FLOAT_DTYPES, GradSum, Model
from .ops import OPS, Op
from .spec import INPUT, MAX_NODES, MAX_PARAMETERS, MAX_WIDTH, Graph, Node, parse_spec

__all__ = [
    "Model",
    "GradSum",
    "FLOAT_DTYPES",
    "parse_spec",
    "Graph",
    "Node",
    "INPUT",
    "MAX_NODES",
    "MAX_WIDTH",
    "MAX_PARAMETERS",
    "OPS",
    "Op",
    "LOSSES",
    "Loss",
    "gradcheck",
    "numerical_gradient",
    "GradcheckReport",
]
