"""A TCP proxy on 127.0.0.1 that forwards to a gRPC server and can cut the connection on cue.

It reads the server-to-client byte stream as HTTP/2 frames (9-byte header: length, type, flags,
stream id), so it can drop the connection at a precise point of a call:

- `cut_before_response()`: when the server starts answering a call (its first HEADERS frame on a
  stream), both sockets are closed and that frame is never delivered. The server has done the work
  (a step applied) but the client never hears of it: the hardest case for exactly-once.
- `cut_after_request_bytes(n)`: once `n` more bytes have gone from client to server, both sockets
  are closed mid-request: the server never sees the whole call.

Each cut fires once; later connections are forwarded untouched.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["CuttingProxy"]

FRAME_HEADER_BYTES = 9
HEADERS_FRAME = 0x1


class CuttingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut_before_response = False
        self._cut_after_bytes: int | None = None
        self.cuts = 0  # connections cut so far
        self._connections: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_before_response(self) -> None:
        with self._lock:
            self._cut_before_response = True

    def cut_after_request_bytes(self, nbytes: int) -> None:
        with self._lock:
            self._cut_after_bytes = nbytes

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for pair in list(self._connections):
            _close(*pair)

    def __enter__(self) -> "CuttingProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- forwarding --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            self._connections.append(pair)
            threading.Thread(target=self._client_to_server, args=pair, daemon=True).start()
            threading.Thread(target=self._server_to_client, args=pair, daemon=True).start()

    def _cut(self, client, server) -> None:
        self.cuts += 1
        _close(client, server)

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                break
            if not data:
                break
            with self._lock:
                budget = self._cut_after_bytes
                if budget is not None:
                    if len(data) >= budget:
                        self._cut_after_bytes = None
                        data = data[:budget]
                    else:
                        self._cut_after_bytes = budget - len(data)
            try:
                server.sendall(data)
            except OSError:
                break
            if budget is not None and self._cut_after_bytes is None:
                self._cut(client, server)
                return
        _close(client, server)

    def _server_to_client(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                break
            if not data:
                break
            buffer += data
            # Forward whole frames only, so a cut lands exactly before a frame.
            while len(buffer) >= FRAME_HEADER_BYTES:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < FRAME_HEADER_BYTES + length:
                    break
                frame_type = buffer[3]
                stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                with self._lock:
                    cut = self._cut_before_response and frame_type == HEADERS_FRAME and stream_id > 0
                    if cut:
                        self._cut_before_response = False
                if cut:
                    self._cut(client, server)
                    return
                frame, buffer = buffer[:FRAME_HEADER_BYTES + length], buffer[FRAME_HEADER_BYTES + length:]
                try:
                    client.sendall(frame)
                except OSError:
                    _close(client, server)
                    return
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
