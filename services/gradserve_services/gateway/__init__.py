"""gRPC gateway: thin servicers over the cluster executor and the session registry, one error
mapping (status.py), bearer-token auth, metrics, health and reflection. See `create_server`."""

from .auth import LOCAL_IDENTITY, Authenticator, load_tokens, parse_tokens
from .server import SERVICE_NAME, GatewayServer, create_server
from .sessions import Session, SessionLimits, SessionRegistry
from .status import rpc_status_for, status_code_for

__all__ = [
    "create_server",
    "GatewayServer",
    "SERVICE_NAME",
    "SessionRegistry",
    "SessionLimits",
    "Session",
    "Authenticator",
    "LOCAL_IDENTITY",
    "load_tokens",
    "parse_tokens",
    "status_code_for",
    "rpc_status_for",
]
