"""Message limits both ends set, and opening a channel with them."""

from __future__ import annotations

import grpc

from gradserve.transfer import MAX_MESSAGE_BYTES

__all__ = ["CHANNEL_OPTIONS", "TRANSPORT_RECEIVE_BYTES", "SERVER_OPTIONS", "open_channel"]

# Set explicitly on both ends (the service uses the same numbers); see service.proto.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# A message over gRPC's own receive limit is refused by gRPC, which cuts the call off under the
# servicer: the caller gets RESOURCE_EXHAUSTED, but the servicer only sees a cancelled call and can
# neither answer nor count it as such. So the server's gRPC limit sits above the documented
# MAX_MESSAGE_BYTES and the gateway refuses the messages in between itself (gateway/wire.tolerant):
# answered with a BadRequest naming "request" and counted RESOURCE_EXHAUSTED. Only messages beyond
# this bound are still cut off by gRPC: the caller gets gRPC's RESOURCE_EXHAUSTED, the count says
# CANCELLED (or INVALID_ARGUMENT when the servicer saw the stream end first). The bound stays small
# because every call, health checks without a token included, may make gRPC buffer one such message.
TRANSPORT_RECEIVE_BYTES = 2 * MAX_MESSAGE_BYTES
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", TRANSPORT_RECEIVE_BYTES),
)


def open_channel(target: str, tls: bytes | bool | None = None) -> grpc.Channel:
    """A channel to `target` with CHANNEL_OPTIONS. `tls`: None for plaintext, PEM root
    certificate bytes to trust, or True for the system roots."""
    if tls is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    roots = None if tls is True else tls
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
