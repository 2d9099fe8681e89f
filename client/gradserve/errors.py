"""The SDK's one exception tree, mapped from gRPC status codes.

`GradserveError.field_violations` holds the service's `google.rpc.BadRequest` field violations as
(field, description) pairs when googleapis-common-protos is installed; without it the list is empty
and the message (which names the field too) is all there is. The SDK never requires it.
"""

from __future__ import annotations

import grpc

__all__ = [
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
    "from_rpc_error",
]


class GradserveError(Exception):
    """Base class: `code` (grpc.StatusCode or None for local errors), `message`, `field_violations`."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, field_violations: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        self.field_violations = tuple(field_violations)

    @property
    def field(self) -> str:
        """The first field the service named, or ''."""
        return self.field_violations[0][0] if self.field_violations else ""


class InvalidArgument(GradserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GradserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GradserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GradserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GradserveError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(GradserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(GradserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(GradserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GradserveError):
    code = grpc.StatusCode.CANCELLED


class Internal(GradserveError):
    """INTERNAL, UNKNOWN and any other code: a fault of the service, not of the request."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in GradserveError.__subclasses__()}


def from_rpc_error(error: grpc.RpcError) -> GradserveError:
    """The GradserveError for a failed call (`error` is also a grpc.Call)."""
    code = error.code()
    cls = _BY_CODE.get(code, Internal)
    exception = cls(f"{code.name}: {error.details()}", _field_violations(error))
    exception.code = code
    return exception


def _field_violations(error: grpc.RpcError) -> tuple[tuple[str, str], ...]:
    try:
        from google.rpc import error_details_pb2, status_pb2  # optional: googleapis-common-protos
    except ImportError:
        return ()
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        violations = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
        return tuple(violations)
    return ()
