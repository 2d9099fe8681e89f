"""The one mapping from domain errors to gRPC status codes, with `google.rpc.BadRequest` details.

Every servicer failure goes through `abort_with`; a client's mistake is never INTERNAL or UNKNOWN,
because everything a client can get wrong is raised as a `GradserveError` subclass with its field.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve_services import errors

__all__ = ["status_code_for", "rpc_status_for", "abort_with", "abort_internal"]

log = logging.getLogger(__name__)

# Most specific first: SpecError is an InvalidArgument.
_CODES: tuple[tuple[type[errors.GradserveError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_code_for(error: errors.GradserveError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL  # a GradserveError subclass nobody mapped: our bug


def rpc_status_for(error: errors.GradserveError) -> grpc.Status:
    """The status to answer with: code, message naming the field, BadRequest detail if a field."""
    code = status_code_for(error)
    status = status_pb2.Status(code=code.value[0], message=str(error))
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def abort_with(context: grpc.ServicerContext, error: errors.GradserveError):
    """End the call with the status for `error` (raises, as grpc's abort does)."""
    context.abort_with_status(rpc_status_for(error))


def abort_internal(context: grpc.ServicerContext, method: str, error: BaseException):
    """An unexpected failure: logged in full here, answered without internals."""
    log.exception("%s failed unexpectedly", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the service log")

