"""The one exception tree, shared by the SDK and the service (`gradserve_services.errors` is this
module): plain Python, so that the engine can raise it without importing gRPC.

Every error names what was wrong in `field` (a tensor, a node, a request field) or leaves it empty.
`field_violations` holds the fields as (field, description) pairs: the service's
`google.rpc.BadRequest` violations for an error decoded from a status (when
googleapis-common-protos is installed; without it the list is empty and the message, which names
the field too, is all there is).

`code` is the gRPC status code of a class (None for the base class); the mapping of classes to and
from codes lives in one module of the RPC plumbing, `gradserve.rpc.status`, imported only when a
code is first read. An error decoded from a status carries that status's own code.
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
    "Cancelled",
    "Internal",
]


class _StatusCode:
    """`code` on a class or an instance without a code of its own: looked up in the RPC plumbing's
    mapping on first use, so this module (and the engine raising it) never imports grpc. A
    non-data descriptor, so an instance decoded from a status may set its own `code`."""

    def __get__(self, error, cls):
        from gradserve.rpc.status import status_code_of  # grpc: only where a code is asked for

        return status_code_of(cls)


class GradserveError(Exception):
    """Base class: `message`, `field`, `field_violations`, `code`."""

    code = _StatusCode()

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field
        self.field_violations: tuple[tuple[str, str], ...] = ((field, message),) if field else ()
        self._message_names_field = False

    @classmethod
    def described(cls, message: str, field_violations=()) -> "GradserveError":
        """An error whose `message` already names its fields (a status's message, or one
        written as `field: description`): its first violation's field is `field`, and `str()` is
        the message alone."""
        field_violations = tuple(field_violations)
        error = cls(message, field_violations[0][0] if field_violations else "")
        error.field_violations = field_violations
        error._message_names_field = True
        return error

    def __str__(self) -> str:
        if self.field and not self._message_names_field:
            return f"{self.field}: {self.message}"
        return self.message


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


class Cancelled(GradserveError):
    """The call was cancelled before it finished."""


class Internal(GradserveError):
    """INTERNAL, UNKNOWN and any other code: a fault of the service, not of the request."""
