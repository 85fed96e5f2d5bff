"""The one exception the protocol layer raises about bytes received from a peer."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class ErrorKind(StrEnum):
    """What was wrong. Values are stable snake_case strings: they are used as metric labels."""

    BAD_VERSION = "bad_version"
    """Version bits of the header are not 1 (fatal)."""
    BAD_FLAGS = "bad_flags"
    """Reserved flag bits (fatal), or REPLY/NEED_REPLY where they do not belong (skipped)."""
    UNKNOWN_REQUEST = "unknown_request"
    """Request code not defined for this channel, including 0 (skipped)."""
    OVERSIZE = "oversize"
    """Size field beyond MAX_PAYLOAD (fatal: we will not buffer it)."""
    BAD_SIZE = "bad_size"
    """Payload size does not match what the request code carries (skipped)."""
    BAD_PAYLOAD = "bad_payload"
    """A payload field outside the wire format's domain, e.g. nregions > 8 (skipped)."""
    BAD_FDS = "bad_fds"
    """Wrong number of fds for the message (skipped), or fds with no message at EOF."""
    TRUNCATED = "truncated"
    """The peer closed the stream in the middle of a message (fatal)."""


class ProtocolError(Exception):
    """A message (or the stream) the peer sent is malformed.

    fatal=True: the byte stream can no longer be trusted, close the connection.
    fatal=False: the framer already skipped exactly this message; reading may go on.
    In both cases `fds` are the fds that came with the bad input: the caller must close them.
    `code` and `flags` are the raw header fields when the header was read (else None), so a
    caller can, e.g., answer a skipped NEED_REPLY request with a failure ack.
    """

    kind: ErrorKind
    fatal: bool
    code: int | None
    flags: int | None
    fds: list[int]

    def __init__(
        self,
        kind: ErrorKind,
        detail: str,
        *,
        fatal: bool,
        code: int | None = None,
        flags: int | None = None,
        fds: Sequence[int] = (),
    ) -> None:
        self.kind = kind
        self.detail = detail
        self.fatal = fatal
        self.code = code
        self.flags = flags
        self.fds = list(fds)
        super().__init__(str(self))

    @property
    def need_reply(self) -> bool:
        """The skipped message asked for an ack (NEED_REPLY set, REPLY clear)."""
        return self.flags is not None and self.flags & 0xC == 0x8

    def __str__(self) -> str:
        where = ""
        if self.code is not None:
            flags = "" if self.flags is None else f", flags {self.flags:#x}"
            where = f" (request {self.code}{flags})"
        what = "fatal" if self.fatal else "message skipped"
        fds = f", {len(self.fds)} fd(s) to close" if self.fds else ""
        return f"{self.kind}: {self.detail}{where}; {what}{fds}"
