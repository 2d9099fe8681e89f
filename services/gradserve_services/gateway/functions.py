"""The model as a function, computed in the gateway's process: Forward (stateless or at a session's
current parameters) and vector-Jacobian products. Neither changes any state, so neither needs the
cluster's sharding or exactly-once machinery; the engine's micro-batching bounds their memory."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The wire's tensor names, as the SDK spells them: "output_gradient" (vector-Jacobian mode's
# request tensor), "input_gradients.<batch tensor>" and Forward's "outputs.<node>".
from gradserve.tensor_names import INPUT_GRADIENTS, OUTPUT_GRADIENT, OUTPUTS
from gradserve_services.cluster.worker import ModelCache
from gradserve_services.engine.vjp import VJP, forward_nodes, vjp
from gradserve_services.errors import InvalidArgument

__all__ = ["ModelFunctions", "OUTPUT_GRADIENT", "INPUT_GRADIENTS", "OUTPUTS"]

MAX_CACHED_MODELS = 32


class ModelFunctions:
    def __init__(self):
        self._models = ModelCache(MAX_CACHED_MODELS)

    def forward(self, spec, params: Mapping[str, np.ndarray], x, nodes=()) -> dict[str, np.ndarray]:
        model = self._models.get(spec)
        model.validate_parameters(params)
        return forward_nodes(model, params, x, list(nodes))

    def vjp(self, spec, params: Mapping[str, np.ndarray], x, y, output_gradient, *,
            input_gradient: bool, micro_batch_size=None) -> VJP:
        if y is not None:
            raise InvalidArgument("send batch.y (a built-in loss) or output_gradient, not both", OUTPUT_GRADIENT)
        model = self._models.get(spec)
        model.validate_parameters(params)
        return vjp(model, params, x, output_gradient, input_gradient=input_gradient,
                   micro_batch_size=micro_batch_size)
