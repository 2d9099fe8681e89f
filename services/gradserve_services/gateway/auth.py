"""Bearer-token authentication: tokens map to identities; an interceptor turns away unknown tokens.

Tokens come from a file or the GRADSERVE_AUTH_TOKENS environment variable, one `IDENTITY:TOKEN`
per line (or comma-separated in the variable). Auth is off only when the server is created with
`auth_tokens=None` (`gradserve serve --no-auth`, for local use).
"""

from __future__ import annotations

import hmac
import os

import grpc

from gradserve.rpc.methods import behavior_of, rewrapped

from gradserve_services.errors import InvalidArgument

__all__ = ["LOCAL_IDENTITY", "TOKENS_ENV", "Authenticator", "AuthInterceptor", "CallContext", "parse_tokens",
           "load_tokens"]

LOCAL_IDENTITY = "local"  # every caller's identity when auth is off
TOKENS_ENV = "GRADSERVE_AUTH_TOKENS"
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)  # probes carry no token
MIN_TOKEN_LENGTH = 16


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{token: identity} from `IDENTITY:TOKEN` entries (lines or commas; `#` starts a comment)."""
    tokens: dict[str, str] = {}
    for number, entry in enumerate(text.replace(",", "\n").splitlines(), start=1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        identity, separator, token = entry.partition(":")
        identity, token = identity.strip(), token.strip()
        if not separator or not identity or len(token) < MIN_TOKEN_LENGTH:
            raise InvalidArgument(
                f"entry {number} is not IDENTITY:TOKEN with a token of >= {MIN_TOKEN_LENGTH} characters", source
            )
        tokens[token] = identity
    if not tokens:
        raise InvalidArgument("no tokens", source)
    return tokens


def load_tokens(path: str | None) -> dict[str, str]:
    """Tokens from `path`, else from $GRADSERVE_AUTH_TOKENS; InvalidArgument if neither has any."""
    if path:
        with open(path, encoding="utf-8") as handle:
            return parse_tokens(handle.read(), path)
    return parse_tokens(os.environ.get(TOKENS_ENV, ""), TOKENS_ENV)


class Authenticator:
    """Who is calling. With `tokens=None` everyone is LOCAL_IDENTITY (auth off)."""

    def __init__(self, tokens: dict[str, str] | None):
        self._tokens = None if tokens is None else dict(tokens)

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def identity_for(self, metadata) -> str | None:
        if self._tokens is None:
            return LOCAL_IDENTITY
        presented = bearer_token(metadata)
        if presented is None:
            return None
        identity = None
        for token, owner in self._tokens.items():  # compare with every token: no timing signal
            if hmac.compare_digest(token.encode(), presented.encode()):
                identity = owner
        return identity


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class CallContext:
    """A call's gRPC context plus `identity`, who is calling, established once by the interceptor
    and passed along: servicer methods read `context.identity`."""

    def __init__(self, context: grpc.ServicerContext, identity: str):
        self._context = context
        self.identity = identity

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class AuthInterceptor(grpc.ServerInterceptor):
    """Establishes each call's identity from its metadata, once: a call with a missing or unknown
    token is answered UNAUTHENTICATED before any servicer code runs; the others get a CallContext.
    Health probes carry no token and pass as they are."""

    def __init__(self, authenticator: Authenticator):
        self._authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(UNAUTHENTICATED_METHODS):
            return continuation(handler_call_details)
        identity = self._authenticator.identity_for(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if identity is None:
            return _refusing(handler)
        behavior = behavior_of(handler)
        return rewrapped(handler, lambda request, context: behavior(request, CallContext(context, identity)))


def _refuse(request_or_iterator, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that refuses the call."""
    return rewrapped(handler, _refuse)
