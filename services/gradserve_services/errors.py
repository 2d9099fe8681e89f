"""The service side's exception tree: the SDK's own (`gradserve.errors`), one tree for both, so a
caller catches one class whichever side raised it.

Every domain error carries the field it is about, so the gateway can answer with a status code and a
`google.rpc.BadRequest` naming that field. The classes map to gRPC codes in one place of the RPC
plumbing (`gradserve.rpc.status`); nothing else on the service side knows about gRPC codes.
"""

from __future__ import annotations

from gradserve import errors as _tree
from gradserve.errors import *  # noqa: F403 - the one tree, re-exported whole

__all__ = list(_tree.__all__)
