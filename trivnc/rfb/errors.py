# A small flat hierarchy, after h11's _util.py and httpcore's _exceptions.py:
# the peer broke the protocol (RemoteProtocolError), we were asked to do
# something the protocol forbids (LocalProtocolError), or authentication
# failed (AuthenticationFailed, a RemoteProtocolError so that one `except`
# closes the connection). Each carries a reason fit for a log line and, in
# RFB 3.8, for the failure message sent to the client.
from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the connection cannot go on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol or the state forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of order."""


class AuthenticationFailed(RemoteProtocolError):
    """The peer's credentials were refused."""
