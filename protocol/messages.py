"""The typed message the framer hands out."""

from __future__ import annotations

from dataclasses import dataclass

from .enums import BackendRequest, FrontendRequest, HeaderFlag
from .payloads import Payload


@dataclass(slots=True)
class Message:
    """One decoded message: a request, or a reply to a request with the same code.

    `fds` came with the message via SCM_RIGHTS and now belong to the consumer, which must close
    every one it does not keep.
    """

    code: FrontendRequest | BackendRequest
    flags: HeaderFlag
    payload: Payload
    fds: list[int]

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        """The sender waits for an ack (only meaningful with REPLY_ACK negotiated)."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)
