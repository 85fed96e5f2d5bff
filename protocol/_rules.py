"""What each request code carries: payload kind of the request and of its reply, and fd count.

This table is the single place where per-code rules live; the framer (decoding) and the encoder
both read it, so the two directions cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from .enums import BackendRequest, FrontendRequest


class Kind(Enum):
    """Payload layouts; `_codec` maps each one to its decoder and encoder."""

    EMPTY = auto()
    U64 = auto()
    VRING_FD = auto()
    VRING_STATE = auto()
    VRING_ADDR = auto()
    MEM_TABLE = auto()
    SINGLE_REGION = auto()
    LOG = auto()
    IOTLB = auto()
    CONFIG = auto()
    INFLIGHT = auto()
    VRING_AREA = auto()
    OPAQUE = auto()
    """Any size, not decoded (payload None): requests a net back-end never implements."""


class Fds(Enum):
    """How many fds must come with a message."""

    NONE = auto()
    ONE = auto()
    OPTIONAL = auto()
    """0 or 1: REM_MEM_REG, where the spec tells back-ends to accept (and close) a stray fd."""
    PER_REGION = auto()
    """One per region of a SET_MEM_TABLE."""
    UNLESS_NO_FD = auto()
    """1, or 0 when the payload's no-fd bit (0x100) is set."""


@dataclass(frozen=True, slots=True)
class Rule:
    code: FrontendRequest | BackendRequest
    request: Kind
    fds: Fds = Fds.NONE
    reply: Kind = Kind.U64
    reply_fds: Fds = Fds.NONE


def _table(*rules: Rule) -> dict[int, Rule]:
    return {int(rule.code): rule for rule in rules}


F = FrontendRequest
FRONTEND_RULES = _table(
    Rule(F.GET_FEATURES, Kind.EMPTY),
    Rule(F.SET_FEATURES, Kind.U64),
    Rule(F.SET_OWNER, Kind.EMPTY),
    Rule(F.RESET_OWNER, Kind.EMPTY),
    Rule(F.SET_MEM_TABLE, Kind.MEM_TABLE, Fds.PER_REGION),
    Rule(F.SET_LOG_BASE, Kind.LOG, Fds.ONE, reply=Kind.EMPTY),  # LOG_SHMFD: an empty reply
    Rule(F.SET_LOG_FD, Kind.EMPTY, Fds.ONE),
    Rule(F.SET_VRING_NUM, Kind.VRING_STATE),
    Rule(F.SET_VRING_ADDR, Kind.VRING_ADDR),
    Rule(F.SET_VRING_BASE, Kind.VRING_STATE),
    Rule(F.GET_VRING_BASE, Kind.VRING_STATE, reply=Kind.VRING_STATE),
    Rule(F.SET_VRING_KICK, Kind.VRING_FD, Fds.UNLESS_NO_FD),
    Rule(F.SET_VRING_CALL, Kind.VRING_FD, Fds.UNLESS_NO_FD),
    Rule(F.SET_VRING_ERR, Kind.VRING_FD, Fds.UNLESS_NO_FD),
    Rule(F.GET_PROTOCOL_FEATURES, Kind.EMPTY),
    Rule(F.SET_PROTOCOL_FEATURES, Kind.U64),
    Rule(F.GET_QUEUE_NUM, Kind.EMPTY),
    Rule(F.SET_VRING_ENABLE, Kind.VRING_STATE),
    Rule(F.SEND_RARP, Kind.U64),
    Rule(F.NET_SET_MTU, Kind.U64),
    Rule(F.SET_BACKEND_REQ_FD, Kind.EMPTY, Fds.ONE),
    Rule(F.IOTLB_MSG, Kind.IOTLB),
    Rule(F.SET_VRING_ENDIAN, Kind.VRING_STATE),
    Rule(F.GET_CONFIG, Kind.CONFIG, reply=Kind.CONFIG),
    Rule(F.SET_CONFIG, Kind.CONFIG),
    Rule(F.CREATE_CRYPTO_SESSION, Kind.OPAQUE),
    Rule(F.CLOSE_CRYPTO_SESSION, Kind.U64),
    Rule(F.POSTCOPY_ADVISE, Kind.EMPTY),
    Rule(F.POSTCOPY_LISTEN, Kind.EMPTY),
    Rule(F.POSTCOPY_END, Kind.EMPTY),
    Rule(F.GET_INFLIGHT_FD, Kind.INFLIGHT, reply=Kind.INFLIGHT, reply_fds=Fds.ONE),
    Rule(F.SET_INFLIGHT_FD, Kind.INFLIGHT, Fds.ONE),
    Rule(F.GPU_SET_SOCKET, Kind.EMPTY, Fds.ONE),
    Rule(F.RESET_DEVICE, Kind.EMPTY),
    Rule(F.VRING_KICK, Kind.VRING_STATE),
    Rule(F.GET_MAX_MEM_SLOTS, Kind.EMPTY),
    Rule(F.ADD_MEM_REG, Kind.SINGLE_REGION, Fds.ONE),
    Rule(F.REM_MEM_REG, Kind.SINGLE_REGION, Fds.OPTIONAL),
    Rule(F.SET_STATUS, Kind.U64),
    Rule(F.GET_STATUS, Kind.EMPTY),
)

B = BackendRequest
BACKEND_RULES = _table(
    Rule(B.IOTLB_MSG, Kind.IOTLB),
    Rule(B.CONFIG_CHANGE_MSG, Kind.EMPTY),
    Rule(B.VRING_HOST_NOTIFIER_MSG, Kind.VRING_AREA, Fds.UNLESS_NO_FD),
    Rule(B.VRING_CALL, Kind.VRING_STATE),
    Rule(B.VRING_ERR, Kind.VRING_STATE),
)

RULES: dict[type[FrontendRequest] | type[BackendRequest], dict[int, Rule]] = {
    FrontendRequest: FRONTEND_RULES,
    BackendRequest: BACKEND_RULES,
}
"""Keyed by enum class: FrontendRequest and BackendRequest codes overlap as integers."""


def rule_for(code: FrontendRequest | BackendRequest) -> Rule:
    """The rule of an enum member; TypeError for a bare int (its channel would be ambiguous)."""
    table = RULES.get(type(code))
    if table is None:
        raise TypeError(f"code must be a FrontendRequest or BackendRequest, not {code!r}")
    return table[int(code)]
