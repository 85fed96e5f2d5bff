"""Frontend against a scripted fake back-end on a socketpair (no DPDK needed).

Checks the QEMU-like behaviours tests rely on: a MISS is answered with an
UPDATE on the main channel with NEED_REPLY; an unmapped IOVA gets nothing;
the NEVER policy stays silent; a silent back-end fails fast instead of hanging.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from protocol import (
    BackendRequest,
    Framer,
    FrontendRequest,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    Message,
    ProtocolFeature,
    encode_ack,
    encode_reply,
    encode_request,
)
from tests.vusim.channel import Channel
from tests.vusim.frontend import Frontend
from tests.vusim.viommu import MissMode


class FakeBackend:
    """Just enough of a back-end to drive the Frontend from a test."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.main = Channel(sock, FrontendRequest)
        self.main.framer = Framer(FrontendRequest)  # we read requests here
        self.backend: Channel | None = None

    async def next(self) -> Message:
        with trio.fail_after(2):
            return await self.main.receive()

    async def miss(self, iova: int, perm: IotlbPerm) -> None:
        assert self.backend is not None
        msg = IotlbMsg(iova, 0, 0, perm, IotlbType.MISS)
        await self.backend.send(encode_request(BackendRequest.IOTLB_MSG, msg))


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def _with_backend_channel(fe: Frontend, be: FakeBackend) -> None:
    fe.protocol_features = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
    async with trio.open_nursery() as n:
        n.start_soon(fe.set_backend_req_fd)
        msg = await be.next()
    assert msg.code == FrontendRequest.SET_BACKEND_REQ_FD
    [fd] = msg.fds
    be.backend = Channel(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)), BackendRequest)


def test_get_features_and_ack() -> None:
    async def main() -> None:
        a, b = _pair()
        be = FakeBackend(b)
        async with Frontend.attach(a) as fe, trio.open_nursery() as n:
            fe.protocol_features = ProtocolFeature.REPLY_ACK

            async def serve() -> None:
                msg = await be.next()
                await be.main.send(encode_reply(msg.code, 0x1_0000_0000))
                msg = await be.next()
                assert msg.need_reply
                await be.main.send(encode_ack(msg.code, True))

            n.start_soon(serve)
            assert await fe.get_features() == 0x1_0000_0000
            await fe.set_status(0xB)
        b.close()

    trio.run(main)


def test_miss_answered_on_main_channel_with_need_reply() -> None:
    async def main() -> None:
        a, b = _pair()
        be = FakeBackend(b)
        async with Frontend.attach(a) as fe:
            await _with_backend_channel(fe, be)
            gpa = fe.ram.alloc(4096, 4096)
            fe.viommu.map(0xD000_0000, gpa, 4096, IotlbPerm.READ)
            await be.miss(0xD000_0123, IotlbPerm.READ)
            upd = await be.next()
            assert upd.code == FrontendRequest.IOTLB_MSG and upd.need_reply
            assert isinstance(upd.payload, IotlbMsg)
            assert (upd.payload.iova, upd.payload.size) == (0xD000_0000, 4096)
            assert upd.payload.uaddr == fe.ram.gpa_to_uaddr(gpa)
            await be.main.send(encode_ack(upd.code, True))
            await be.miss(0xE000_0000, IotlbPerm.READ)  # unmapped: no answer
            fe.viommu.policy.mode = MissMode.NEVER
            await be.miss(0xD000_0000, IotlbPerm.READ)
            with trio.move_on_after(0.2) as scope:
                await be.next()
            assert scope.cancelled_caught
            assert len(fe.viommu.misses()) == 3
            [sent] = fe.viommu.sent(IotlbType.UPDATE)
            assert sent.ack == 0
        b.close()

    trio.run(main)


def test_silent_backend_fails_fast() -> None:
    async def main() -> None:
        a, b = _pair()
        async with Frontend.attach(a, timeout=0.2) as fe:
            with pytest.raises(trio.TooSlowError):
                await fe.get_features()
        b.close()

    trio.run(main)


def test_kick_and_call_are_real_eventfds() -> None:
    async def main() -> None:
        a, b = _pair()
        async with Frontend.attach(a) as fe:
            vring = fe.add_ring(0, 8)
            fe.kick(0)
            assert os.eventfd_read(vring.kick) == 1
            assert not await fe.wait_call(0, 0.05)
            os.eventfd_write(vring.call, 1)
            assert await fe.wait_call(0, 0.5)
        b.close()

    trio.run(main)
