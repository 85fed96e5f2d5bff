"""Messages to bytes: the sending half. Pure functions; fds travel separately (SCM_RIGHTS).

The payload kind for each code comes from `_rules`, the same table the framer decodes with.
Passing a payload of the wrong type is a programming error (TypeError); a field that does not
fit its wire width is a ValueError.
"""

from __future__ import annotations

from ._codec import encode_payload
from ._rules import Kind, rule_for
from ._structs import HEADER_S
from .enums import BackendRequest, FrontendRequest, HeaderFlag
from .payloads import Payload

_REPLY_FLAGS = HeaderFlag.VERSION | HeaderFlag.REPLY  # exactly 0x5: QEMU/DPDK reject others


def _message(code: FrontendRequest | BackendRequest, flags: int, body: bytes) -> bytes:
    return HEADER_S.pack(code, flags, len(body)) + body


def encode_request(
    code: FrontendRequest | BackendRequest, payload: Payload = None, *, need_reply: bool = False
) -> bytes:
    """A request: flags VERSION, plus NEED_REPLY if the sender wants an ack."""
    body = encode_payload(rule_for(code).request, payload)
    flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return _message(code, flags, body)


def encode_reply(code: FrontendRequest | BackendRequest, payload: Payload) -> bytes:
    """The reply to request `code`: VringState for GET_VRING_BASE, ConfigSpace for GET_CONFIG,
    InflightInfo for GET_INFLIGHT_FD, a u64 (int) for everything else."""
    return _message(code, _REPLY_FLAGS, encode_payload(rule_for(code).reply, payload))


def encode_ack(code: FrontendRequest | BackendRequest, ok: bool) -> bytes:
    """The REPLY_ACK answer to a NEED_REPLY request: u64 0 on success, 1 on failure.

    ValueError for a request whose reply has a body of its own: such a request gets that body
    and never a second, ack-only reply.
    """
    if rule_for(code).reply is not Kind.U64:
        raise ValueError(f"{code.name} is answered with its reply body, not an ack")
    return encode_reply(code, 0 if ok else 1)
