"""One vhost-user socket: bytes + SCM_RIGHTS fds over trio, decoded by protocol's Framer.

Kept apart from the Frontend so the raw-bytes tests (malformed framing)
and the typed path share one place that knows about ancillary data.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence

import trio

from protocol import MAX_FDS, BackendRequest, Framer, FrontendRequest, Message

_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelClosed(Exception):
    """The peer closed the socket."""


class Channel:
    def __init__(
        self, sock: trio.socket.SocketType, codes: type[FrontendRequest] | type[BackendRequest]
    ) -> None:
        self.sock = sock
        # We send requests on the main channel and read replies; on the back-end
        # channel we read the back-end's requests.
        self.framer = Framer(codes, expect_replies=codes is FrontendRequest)
        self.closed = False

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        view = memoryview(data)
        sent = await self.sock.sendmsg([view], anc)
        while sent < len(view):
            sent += await self.sock.send(view[sent:])

    async def receive(self) -> Message:
        """Next whole message; raises ChannelClosed at EOF (ProtocolError if mid-message)."""
        while True:
            msg = self.framer.next_message()
            if msg is not None:
                return msg
            if self.closed:
                self.framer.eof()
                raise ChannelClosed
            data, anc, _flags, _addr = await self.sock.recvmsg(65536, _ANC)
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if not data:
                for fd in fds:
                    os.close(fd)
                self.closed = True
                continue
            self.framer.receive_data(data, fds)

    async def wait_closed(self) -> bytes:
        """Read until EOF, returning any bytes that came meanwhile (for fatal-error tests)."""
        junk = b""
        while True:
            try:
                data = await self.sock.recv(65536)
            except ConnectionResetError:
                return junk
            if not data:
                self.closed = True
                return junk
            junk += data

    def close(self) -> None:
        for fd in self.framer.pending_fds():
            os.close(fd)
        self.sock.close()
