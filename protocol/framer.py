"""Bytes + fds in, typed messages out: the receiving half of a vhost-user channel.

No I/O here. The I/O layer feeds whatever recvmsg() returned to `receive_data()` and then calls
`next_message()` until it returns None. Every framing rule lives in `Framer.next_message`; what
each request code carries lives in `_rules`; byte layouts live in `_structs`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NoReturn

from ._codec import DECODERS, PayloadError
from ._rules import RULES, Fds, Rule
from ._structs import HEADER_S
from .enums import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    BackendRequest,
    FrontendRequest,
    HeaderFlag,
)
from .errors import ErrorKind, ProtocolError
from .messages import Message
from .payloads import MemoryTable, Payload, VringArea, VringFd

# Plain ints: masking with IntFlag members would build an enum object per message.
_VERSION_MASK = 0x3
_REPLY = int(HeaderFlag.REPLY)
_NEED_REPLY = int(HeaderFlag.NEED_REPLY)
_RESERVED_BITS = ~(_VERSION_MASK | _REPLY | _NEED_REPLY)
# The only flag words that can reach a Message; a lookup avoids building an IntFlag per message.
_FLAGS = {
    int(f): f
    for f in (
        HeaderFlag.VERSION,
        HeaderFlag.VERSION | HeaderFlag.REPLY,
        HeaderFlag.VERSION | HeaderFlag.NEED_REPLY,
    )
}


def _fd_bounds(rule: Fds, payload: Payload) -> tuple[int, int]:
    """(min, max) number of fds a message may carry."""
    if rule is Fds.NONE:
        return 0, 0
    if rule is Fds.ONE:
        return 1, 1
    if rule is Fds.OPTIONAL:
        return 0, 1
    if rule is Fds.PER_REGION:
        assert isinstance(payload, MemoryTable)
        return len(payload.regions), len(payload.regions)
    assert isinstance(payload, VringFd | VringArea)
    return (0, 0) if payload.no_fd else (1, 1)


class Framer:
    """Splits one direction of a channel into Messages.

    `codes` says which channel this is (FrontendRequest: the main channel; BackendRequest: the
    back-end channel). Messages with REPLY set are decoded as replies to the request with the same
    code; they are accepted only with `expect_replies=True` (the reading side of whoever sends
    requests on that channel), otherwise they are skipped with a non-fatal bad_flags error.

    Fds: each sender writes one message per sendmsg(), and Linux ends a stream read right after
    the segment that carried fds (it never glues data from after it). So the fds returned by one
    read belong to the message holding the read's last byte: with a read of [A][B+fds] they are
    B's, not A's; with a read that stops inside B they are still B's. Every fd leaves the framer
    exactly once: in a Message, in a ProtocolError, or from `pending_fds()`; the caller closes
    those it does not keep.
    """

    __slots__ = ("_base", "_buf", "_expect_replies", "_failure", "_fd_groups", "_pos", "_rules")

    def __init__(
        self,
        codes: type[FrontendRequest] | type[BackendRequest],
        *,
        expect_replies: bool = False,
    ) -> None:
        rules = RULES.get(codes)
        if rules is None:
            raise TypeError(f"codes must be FrontendRequest or BackendRequest, not {codes!r}")
        self._rules: dict[int, Rule] = rules
        self._expect_replies = expect_replies
        self._buf = bytearray()
        self._pos = 0  # start of the next message in _buf
        self._base = 0  # stream offset of _buf[0]
        self._fd_groups: deque[tuple[int, list[int]]] = deque()  # (stream offset of chunk, fds)
        self._failure: ProtocolError | None = None

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add a chunk as received, with the fds that came with it."""
        if fds:
            last = self._base + len(self._buf) + max(len(data) - 1, 0)
            self._fd_groups.append((last, list(fds)))
        if self._failure is not None:
            return  # the stream is dead; only the fds are kept, for the caller to close
        if self._pos:
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None if more data is needed.

        Raises ProtocolError. If not `fatal`, the bad message has been consumed and the caller may
        call again; if `fatal`, every later call raises a fatal error too.
        """
        if self._failure is not None:
            self._fail(self._failure.kind, "stream already failed: " + self._failure.detail)
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        code, flags, size = HEADER_S.unpack_from(buf, pos)
        if flags & _VERSION_MASK != 1:
            self._fail(ErrorKind.BAD_VERSION, f"version {flags & _VERSION_MASK}", code, flags)
        if flags & _RESERVED_BITS:
            self._fail(ErrorKind.BAD_FLAGS, "reserved flag bits set", code, flags)
        if size > MAX_PAYLOAD:
            self._fail(ErrorKind.OVERSIZE, f"size {size} > {MAX_PAYLOAD}", code, flags)
        end = pos + HEADER_SIZE + size
        if len(buf) < end:
            return None

        # The whole message is here: consume it, so that any error below skips just this one.
        fds = self._claim_fds(self._base + end)
        self._pos = end
        rule = self._rules.get(code)
        if rule is None:
            self._skip(ErrorKind.UNKNOWN_REQUEST, "unknown request", code, flags, fds)
        if flags & _REPLY:
            if not self._expect_replies:
                self._skip(ErrorKind.BAD_FLAGS, "REPLY set but no reply expected", code, flags, fds)
            if flags & _NEED_REPLY:
                self._skip(ErrorKind.BAD_FLAGS, "NEED_REPLY set on a reply", code, flags, fds)
            kind, fd_rule = rule.reply, rule.reply_fds
        else:
            kind, fd_rule = rule.request, rule.fds
        try:
            payload = DECODERS[kind](buf, pos + HEADER_SIZE, size)
        except PayloadError as exc:
            self._skip(exc.kind, f"{rule.code.name}: {exc.detail}", code, flags, fds)
        low, high = _fd_bounds(fd_rule, payload)
        if not low <= len(fds) <= high:
            expected = str(low) if low == high else f"{low}..{high}"
            detail = f"{rule.code.name}: {len(fds)} fds, expected {expected}"
            self._skip(ErrorKind.BAD_FDS, detail, code, flags, fds)
        return Message(rule.code, _FLAGS[flags], payload, fds)

    def eof(self) -> None:
        """The peer closed the stream. Raises a fatal error if it stopped mid-message."""
        if self._failure is not None:
            return
        partial = len(self._buf) - self._pos
        if partial:
            code = flags = None
            if partial >= HEADER_SIZE:
                code, flags, _ = HEADER_S.unpack_from(self._buf, self._pos)
            self._fail(ErrorKind.TRUNCATED, f"peer closed after {partial} bytes", code, flags)
        if self._fd_groups:
            self._fail(ErrorKind.BAD_FDS, "fds arrived without a message")

    def pending_fds(self) -> list[int]:
        """Hand over (and forget) fds not yet handed out, so that the caller can close them."""
        fds = [fd for _, group in self._fd_groups for fd in group]
        self._fd_groups.clear()
        return fds

    def _claim_fds(self, end: int) -> list[int]:
        """The fds whose read ended inside (or before) the message ending at ``end``."""
        groups = self._fd_groups
        if not groups or groups[0][0] >= end:
            return []
        fds: list[int] = []
        while groups and groups[0][0] < end:
            fds += groups.popleft()[1]
        return fds

    def _skip(
        self, kind: ErrorKind, detail: str, code: int, flags: int, fds: list[int]
    ) -> NoReturn:
        raise ProtocolError(kind, detail, fatal=False, code=code, flags=flags, fds=fds)

    def _fail(
        self, kind: ErrorKind, detail: str, code: int | None = None, flags: int | None = None
    ) -> NoReturn:
        """Fatal: drop the buffer, hand over every pending fd, and refuse all later input."""
        error = ProtocolError(
            kind, detail, fatal=True, code=code, flags=flags, fds=self.pending_fds()
        )
        if self._failure is None:
            self._failure = error
            self._buf.clear()
            self._pos = 0
        raise error
