"""gradserve client SDK: numpy in, numpy out, over gRPC. Needs only grpcio, protobuf and numpy.

    from gradserve import Client, mlp
    with Client("127.0.0.1:50051", token=...) as client:
        session = client.create_session(mlp(784, [128], 10), optimizer={"name": "adam", "lr": 1e-3})
        result = client.step(session, x, y)
"""

from . import errors
from .errors import *  # noqa: F403 - the exception tree, loaded eagerly (plain Python)

# Everything else on first use: `gradserve.errors` is the service's exception tree too, and the
# engine raising it must not load grpc or protobuf through this package's import.
_LAZY = {
    "Client": "client", "Gradients": "results", "StepResult": "results", "SessionInfo": "results",
    "Checkpoint": "results", "TableRows": "results", "ForwardStep": "results",
    "mlp": "builders", "GraphBuilder": "builders", "INPUT": "builders",
    "DTYPES": "codec", "encode_tensor": "codec", "decode_tensor": "codec",
    "TensorFormatError": "codec", "TensorTooLarge": "codec",
    "spec_to_proto": "spec", "spec_from_proto": "spec", "optimizer_to_proto": "spec",
    "optimizer_from_proto": "spec",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [*_LAZY, *errors.__all__, "__version__"]
