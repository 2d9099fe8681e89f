"""The service side's exception tree: the SDK's own (`gradserve.errors`), one tree for both, so a
caller catches one class whichever side raised it.

Every domain error carries the field it is about, so the gateway can answer with a status code and a
`google.rpc.BadRequest` naming that field. The classes map to gRPC codes in one place of the RPC
plumbing (`gradserve.rpc.status`); nothing else on the service side knows about gRPC codes.
"""

from __future__ import annotations

from gradserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GradserveError,
    Internal,
    InvalidArgument,
    NotFound,
    ParameterServerLost,
    PermissionDenied,
    ResourceExhausted,
    SpecError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "GradserveError",
    "InvalidArgument",
    "SpecError",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "ParameterServerLost",
    "PermissionDenied",
    "Unauthenticated",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
]
