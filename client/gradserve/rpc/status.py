"""The exception tree's classes to and from gRPC status codes: the one mapping, both ways.

The gateway answers a `GradserveError` with `status_code_of(type(error))`; the SDK turns a failed
call into the class of its code (`from_rpc_error`), any code nobody mapped into `Internal`.
"""

from __future__ import annotations

import grpc

from gradserve import errors

__all__ = ["CODES", "status_code_of", "from_rpc_error", "field_violations"]

# Most specific first: SpecError is an InvalidArgument, ParameterServerLost an Unavailable, and
# they share their parent's code.
CODES: tuple[tuple[type[errors.GradserveError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
)
# A code's class when decoding: the parent, never a subclass that shares its code.
_CLASS_OF = {code: cls for cls, code in CODES}


def status_code_of(cls: type) -> grpc.StatusCode | None:
    """The code a class is answered with; None for the base class (or a class outside the tree)."""
    for mapped, code in CODES:
        if issubclass(cls, mapped):
            return code
    return None


def from_rpc_error(error: grpc.RpcError) -> errors.GradserveError:
    """The GradserveError for a failed call (`error` is also a grpc.Call)."""
    code = error.code()
    cls = _CLASS_OF.get(code, errors.Internal)
    exception = cls.described(f"{code.name}: {error.details()}", field_violations(error))
    exception.code = code
    return exception


def field_violations(error: grpc.RpcError) -> tuple[tuple[str, str], ...]:
    """The `google.rpc.BadRequest` field violations a failed call's status carries."""
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
