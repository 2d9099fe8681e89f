"""gradserve client SDK: numpy in, numpy out, over gRPC. Needs only grpcio, protobuf and numpy.

    from gradserve import Client, mlp
    with Client("127.0.0.1:50051", token=...) as client:
        session = client.create_session(mlp(784, [128], 10), optimizer={"name": "adam", "lr": 1e-3})
        result = client.step(session, x, y)
"""

from .builders import INPUT, GraphBuilder, mlp
from .client import Checkpoint, Client, Gradients, SessionInfo, StepResult
from .codec import DTYPES, TensorFormatError, TensorTooLarge, decode_tensor, encode_tensor
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GradserveError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .spec import optimizer_from_proto, optimizer_to_proto, spec_from_proto, spec_to_proto

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Gradients",
    "StepResult",
    "SessionInfo",
    "Checkpoint",
    "mlp",
    "GraphBuilder",
    "INPUT",
    "GradserveError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "PermissionDenied",
    "Unauthenticated",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
    "DTYPES",
    "encode_tensor",
    "decode_tensor",
    "TensorFormatError",
    "TensorTooLarge",
    "spec_to_proto",
    "spec_from_proto",
    "optimizer_to_proto",
    "optimizer_from_proto",
    "__version__",
]
