"""vhost-user channels: a Unix stream socket carrying messages and fds.

:class:`Channel` joins a trio socket to a :class:`protocol.Framer`: it reads
bytes with their SCM_RIGHTS fds, yields typed messages and sends encoded
ones. :class:`BackendChannel` is the back-end's request channel to the
front-end (SET_BACKEND_REQ_FD), used for IOTLB misses and access failures;
it never waits for an answer, so the main channel's reader cannot deadlock
against a front-end that serves this channel only from its main loop.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import AsyncIterator

import trio

from protocol import (
    MAX_FDS,
    BackendRequest,
    ErrorKind,
    Framer,
    FrontendRequest,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    Message,
    ProtocolError,
    encode_request,
)

log = logging.getLogger(__name__)

RECV_SIZE = 65536
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` and empty the list."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class Channel:
    """One end of a vhost-user stream: messages in, bytes out."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        codes: type[FrontendRequest] | type[BackendRequest],
        *,
        expect_replies: bool = False,
    ) -> None:
        self.sock = sock
        self.framer = Framer(codes, expect_replies=expect_replies)
        self.closed = False

    async def messages(self) -> AsyncIterator[Message]:
        """Yield messages until the peer closes; raises ProtocolError.

        A non-fatal ProtocolError is raised too (after the framer skipped the
        message) so the caller can count it; the caller may resume by
        iterating again.
        """
        framer = self.framer
        while True:
            msg = framer.next_message()
            if msg is not None:
                yield msg
                continue
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(RECV_SIZE, _ANC_SIZE)
            except OSError as exc:
                log.warning("channel read failed: %r", exc)
                data, ancdata, flags = b"", [], 0
            fds = _fds_from(ancdata)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(
                    ErrorKind.BAD_FDS,
                    f"more than {MAX_FDS} fds in one message",
                    fatal=True,
                    fds=fds,
                )
            if not data:
                close_fds(fds)
                self.closed = True
                framer.eof()
                return
            framer.receive_data(data, fds)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send one encoded message, with ``fds`` as SCM_RIGHTS if given."""
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([data], anc)
        else:
            sent = await self.sock.send(data)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        close_fds(self.framer.pending_fds())


class BackendChannel:
    """The back-end's requests to the front-end: IOTLB MISS and ACCESS_FAIL.

    Messages go out without NEED_REPLY, so nothing here ever waits on the
    front-end. A reader task drains (and ignores) anything the front-end
    sends back and notices when the channel closes.
    """

    def __init__(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self._channel = Channel(
            trio.socket.from_stdlib_socket(sock), BackendRequest, expect_replies=True
        )
        self.sent = 0
        self.failed = 0
        # Ring tasks send concurrently; two waiting on a full socket at once
        # would be a trio BusyResourceError, not a queued write.
        self._send_lock = trio.Lock()

    @property
    def open(self) -> bool:
        return not self._channel.closed

    async def send_iotlb(self, kind: IotlbType, iova: int, perm: IotlbPerm) -> bool:
        """Send a MISS or ACCESS_FAIL for ``iova``; False if the channel is gone."""
        if self._channel.closed:
            return False
        msg = IotlbMsg(iova=iova, size=0, uaddr=0, perm=perm, type=kind)
        try:
            async with self._send_lock:
                await self._channel.send(encode_request(BackendRequest.IOTLB_MSG, msg))
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            log.warning("back-end channel send failed: %s", exc)
            self.failed += 1
            self._channel.closed = True
            return False
        self.sent += 1
        return True

    async def drain(self) -> None:
        """Read and discard replies until either side closes the channel."""
        while True:
            try:
                async for msg in self._channel.messages():
                    close_fds(msg.fds)
                return
            except trio.ClosedResourceError:
                # We closed it: a new SET_BACKEND_REQ_FD replaced this channel.
                return
            except ProtocolError as exc:
                close_fds(exc.fds)
                if exc.fatal:
                    log.warning("back-end channel: %s", exc)
                    return

    def close(self) -> None:
        self._channel.close()
