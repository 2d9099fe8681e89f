"""One exception tree for the service side.

Every domain error carries the field it is about, so the gateway can answer with a status code and a
`google.rpc.BadRequest` naming that field. The gateway maps these classes to gRPC codes in exactly one
place (`gradserve_services.gateway.status`); nothing else on the service side knows about gRPC.
"""

from __future__ import annotations

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
]


class GradserveError(Exception):
    """Base class. `field` names what was wrong (a tensor, a node, a request field), or is empty."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(GradserveError):
    """The caller sent something malformed: bad shape, dtype, NaN, label out of range, ..."""


class SpecError(InvalidArgument):
    """The model spec is malformed: unknown op, cycle, dangling input. `field` names the node."""


class NotFound(GradserveError):
    """No such session (or not one the caller may see)."""


class FailedPrecondition(GradserveError):
    """The request is well formed but the target is not in a state to accept it."""


class ResourceExhausted(GradserveError):
    """Too large, too many, too busy."""


class Unavailable(GradserveError):
    """The cluster (or part of it) cannot be reached right now; retrying may succeed."""


class ParameterServerLost(Unavailable):
    """A parameter server died with the parameters it held: the trainer is rebuilt from a checkpoint
    (the gateway does so itself for a session that checkpoints automatically). Its own class so that
    callers recognise it by type; on the wire it is UNAVAILABLE naming `parameter_server`."""

    def __init__(self, message: str, field: str = "parameter_server"):
        super().__init__(message, field)


class PermissionDenied(GradserveError):
    """Authenticated, but this token may not touch that session."""


class Unauthenticated(GradserveError):
    """No valid token."""


class DeadlineExceeded(GradserveError):
    """The caller's deadline passed before the work finished."""
