"""The ops: one class per op (one module per op family), its forward, backward and tangent (forward-mode) rules side by side.

Every op works on 2-D `(batch, features)` arrays in the parameter dtype, except the lookups, which
read a batch input of ids (`embedding`) or bags (`embedding_bag`) and write 2-D float arrays. A
table's gradient goes to `param_grads.add_rows` as one row per lookup; the sums per id are formed
there (see `sparse_rows.py`). The rules share one
calling convention (see `Op`); the engine in `model.py` walks the graph and owns the bookkeeping:

- `forward` returns the output and whatever the other two rules need later (`saved`);
- `backward` receives the gradient of the loss w.r.t. this node's output, adds the gradients of its
  parameters into `param_grads` and returns one gradient per input (None where `wants` is False);
  the engine sums gradients arriving from several consumers (`+=`), so a rule never accumulates;
- `tangent` carries a forward-mode tangent (a JVP) through the node: input tangents (None means
  zero) and parameter tangents in, the output's tangent out (None when it is zero).

Arrays a rule receives are read-only for it; it writes only into buffers from `ctx.buffer`, which
belong to this node and are reused by the next pass. All arithmetic goes through `ctx.xp`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .activations import GELU, Elementwise, LeakyReLU, ReLU, Sigmoid, Tanh, stable_sigmoid
from .base import Attribute, Choice, Op
from .combine import Add, Concat
from .dense import Dense
from .dropout import Dropout
from .interaction import DotInteraction
from .layernorm import LayerNorm
from .tables import MAX_TABLE_ROWS, Embedding, EmbeddingBag

__all__ = ["Op", "OPS", "MAX_TABLE_ROWS", "Attribute", "Choice", "Elementwise", "stable_sigmoid"]

OPS: Mapping[str, Op] = {
    op.kind: op
    for op in (
        Dense(), ReLU(), LeakyReLU(), Sigmoid(), Tanh(), GELU(), Add(), Concat(), LayerNorm(), Dropout(),
        Embedding(), EmbeddingBag(), DotInteraction(),
    )
}
