"""gradserve's autodiff engine: numpy (or any numpy-like array namespace `xp`), no I/O.

A model is data (a spec, see docs/ARCHITECTURE.md); `Model` validates it and computes the loss and
its gradient by reverse mode (one backward pass, micro-batch accumulation) or a directional
derivative by forward mode (`jvp`). Tables (embedding lookups) have gradients as `SparseRows`.
"""

from __future__ import annotations

from .batch import Bag, Batch
from .gradcheck import GradcheckReport, gradcheck, numerical_gradient
from .inputs import INPUT_KINDS, InputDecl
from .losses import LOSSES, Loss
from .lookups import rows_read
from .model import FLOAT_DTYPES, GradSum, Model
from .ops import OPS, Op
from .sparse_rows import SparseRows, dense_gradients
from .spec import INPUT, MAX_NODES, MAX_PARAMETERS, MAX_WIDTH, Graph, Node, parse_spec
from .table_init import table_rows

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
    "SparseRows",
    "dense_gradients",
    "table_rows",
    "rows_read",
    "Batch",
    "Bag",
    "InputDecl",
    "INPUT_KINDS",
]
