"""The wire's tensor names: a request's or answer's tensors are named `PREFIX + parameter or node`
(`parameters.fc1.weight`, `outputs.logits`), the batch `batch.x` / `batch.y` or `batch.<input>`.
Both ends import them from here."""

__all__ = ["PARAMETERS", "GRADIENTS", "TANGENT", "OUTPUT_GRADIENT", "INPUT_GRADIENTS", "OUTPUTS"]

PARAMETERS = "parameters."
GRADIENTS = "gradients."
TANGENT = "tangent."
OUTPUT_GRADIENT = "output_gradient"  # vector-Jacobian mode's request tensor, named as it stands
INPUT_GRADIENTS = "input_gradients."
OUTPUTS = "outputs."
