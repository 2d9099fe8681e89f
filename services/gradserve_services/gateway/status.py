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

from gradserve.rpc.status import status_code_of

from gradserve_services import errors

__all__ = ["status_code_for", "rpc_status_for", "capped", "abort_with", "abort_internal"]

log = logging.getLogger(__name__)

# Header bytes a status may spend on its field and on its description; the message repeats both and
# the BadRequest detail (base64) both again, so a status costs at most about 5 KiB of metadata.
FIELD_BUDGET = 256
DESCRIPTION_BUDGET = 1024
ELISION_ROOM = 40  # "...[N characters left out]..."


def status_code_for(error: errors.GradserveError) -> grpc.StatusCode:
    # INTERNAL for a GradserveError of no mapped class: our bug, not the caller's
    return status_code_of(type(error)) or grpc.StatusCode.INTERNAL


def rpc_status_for(error: errors.GradserveError) -> grpc.Status:
    """The status to answer with: code, message naming the field, BadRequest detail if a field.

    Messages echo what the caller sent (a session id, a tensor or node name, an op, a dtype), and
    a status travels in trailing metadata, which clients refuse above 8-16 KiB: the call would end
    in a transport error instead of this status. So field and message are capped here, where
    every status is made, and the whole status stays a few KiB whatever was echoed.
    """
    code = status_code_for(error)
    field = capped(error.field, FIELD_BUDGET)
    description = capped(error.message, DESCRIPTION_BUDGET)
    status = status_pb2.Status(code=code.value[0], message=f"{field}: {description}" if field else description)
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def capped(text: str, budget: int) -> str:
    """`text`, or its head and tail around a note of what was left out, so that it costs at most
    about `budget` bytes as a grpc-message header (which percent-encodes every byte outside
    printable ASCII: up to 12 bytes per character)."""
    if sum(map(_header_cost, text)) <= budget:
        return text
    head = _fitting(text, budget * 2 // 3)
    tail = _fitting(text[::-1], budget // 3 - ELISION_ROOM)[::-1]
    return f"{head}...[{len(text) - len(head) - len(tail)} characters left out]...{tail}"


def _fitting(text: str, budget: int) -> str:
    """The longest prefix of `text` costing at most `budget`."""
    spent = 0
    for index, character in enumerate(text):
        spent += _header_cost(character)
        if spent > budget:
            return text[:index]
    return text


def _header_cost(character: str) -> int:
    if " " <= character <= "~" and character != "%":
        return 1
    return 3 * len(character.encode("utf-8", "surrogatepass"))


def abort_with(context: grpc.ServicerContext, error: errors.GradserveError):
    """End the call with the status for `error` (raises, as grpc's abort does)."""
    context.abort_with_status(rpc_status_for(error))


def abort_internal(context: grpc.ServicerContext, method: str, error: BaseException):
    """An unexpected failure: logged in full here, answered without internals."""
    log.exception("%s failed unexpectedly", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the service log")

