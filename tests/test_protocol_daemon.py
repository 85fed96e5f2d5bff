"""Bad input on the vhost-user socket, against the running daemon.

Every bad message must end in a failure ack (when REPLY_ACK was negotiated
and the request asked for one) or a clean close of that connection, with a
``protocol_errors[kind]`` count; fds that came with it are closed (the
daemon's fd table does not grow) and the daemon keeps serving.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from protocol import (
    FrontendRequest,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
    encode_request,
)
from tests.probe import frame, open_fds, ports, until
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.guestram import GuestRam
from vhostd.port import Port

F = FrontendRequest
HDR = struct.Struct("<III")
PF_WANTED = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS


def raw(code: int, flags: int = 1, payload: bytes = b"", size: int | None = None) -> bytes:
    return HDR.pack(code, flags, len(payload) if size is None else size) + payload


async def negotiated(fe: Frontend, *, iommu: bool = False) -> None:
    """REPLY_ACK on, features set (ACCESS_PLATFORM when ``iommu``)."""
    await fe.set_owner()
    offered = await fe.get_features()
    await fe.set_protocol_features(await fe.get_protocol_features() & PF_WANTED)
    wanted = DEFAULT_NET_FEATURES | (VirtioFeature.ACCESS_PLATFORM if iommu else 0)
    await fe.set_features(wanted & offered)


async def nack(fe: Frontend, code: FrontendRequest, payload: object, fds: list[int] = ()) -> int:  # type: ignore[assignment]
    """Send with NEED_REPLY and return the ack value (non-zero = refused)."""
    reply = await fe.send(code, payload, fds, need_reply=True)  # type: ignore[arg-type]
    assert reply is not None and isinstance(reply.payload, int)
    return reply.payload


async def ended_cleanly(port: Port, fds: int, errors: dict[str, int] | None = None) -> None:
    """The connection is gone, counted under ``errors`` (when given), and left no fd behind."""
    await until(lambda: port.session is None)
    if errors is not None:
        assert port.stats.protocol_errors == errors
    assert open_fds() == fds


async def still_serving(fe: Frontend) -> None:
    assert await fe.get_features() != 0


@asynccontextmanager
async def one_port(**kw: object) -> AsyncIterator[Port]:
    async with ports("sink", **kw) as (_, (port,)):
        yield port


# -- framing ---------------------------------------------------------------

FATAL_FRAMING = {
    "oversize": raw(F.SET_FEATURES, 1, b"", size=0x1001),
    "bad_version": raw(F.GET_FEATURES, 2),
    "bad_flags": raw(F.GET_FEATURES, 1 | 0x10),
}


@pytest.mark.parametrize("kind", FATAL_FRAMING)
@pytest.mark.trio
async def test_fatal_framing_closes_the_connection(kind: str) -> None:
    async with one_port() as port:
        base = open_fds()
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            r, w = os.pipe()
            try:
                await fe.send_raw(FATAL_FRAMING[kind] + bytes(64), [r, w])
            finally:
                os.close(r)
                os.close(w)
            await fe.expect_closed()
        await ended_cleanly(port, base, {kind: 1})
        async with Frontend.connect(port.config.socket) as fe:
            await still_serving(fe)


@pytest.mark.trio
async def test_truncated_message_then_close() -> None:
    async with one_port() as port:
        base = open_fds()
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            await fe.send_raw(raw(F.SET_FEATURES, 1, b"\0" * 8)[:15])
        await ended_cleanly(port, base, {"truncated": 1})
        async with Frontend.connect(port.config.socket) as fe:
            await still_serving(fe)


@pytest.mark.trio
async def test_too_many_fds_closes_and_leaks_nothing() -> None:
    async with one_port() as port:
        base = open_fds()
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            pipes = [os.pipe() for _ in range(6)]
            fds = [fd for p in pipes for fd in p]
            try:
                await fe.send_raw(raw(F.SET_OWNER), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            await fe.expect_closed()
        await ended_cleanly(port, base, {"bad_fds": 1})


SKIPPED = {
    # name: (bytes, expected kind)
    "unknown_request": (raw(99, 1 | 8), "unknown_request"),
    "request_0": (raw(0, 1 | 8), "unknown_request"),
    "reply_bit_in_request": (raw(F.SET_OWNER, 1 | 4), "bad_flags"),
    "bad_size": (raw(F.SET_FEATURES, 1 | 8, b"\0" * 4), "bad_size"),
    "extra_fds": (raw(F.SET_OWNER, 1 | 8), "bad_fds"),
    "iotlb_short": (raw(F.IOTLB_MSG, 1 | 8, b"\0" * 16), "bad_size"),
}


@pytest.mark.parametrize("name", SKIPPED)
@pytest.mark.trio
async def test_skipped_message_is_refused_and_reading_goes_on(name: str) -> None:
    data, kind = SKIPPED[name]
    async with one_port() as port:
        base = open_fds()
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            r, w = os.pipe()
            try:
                await fe.send_raw(data, [r, w] if name == "extra_fds" else [])
            finally:
                os.close(r)
                os.close(w)
            code = struct.unpack_from("<I", data)[0]
            if struct.unpack_from("<I", data, 4)[0] & 8:
                # NEED_REPLY under REPLY_ACK: a failure ack, whatever the code.
                with trio.fail_after(5):
                    data_back = await fe.main.sock.recv(64)
                assert len(data_back) == 20
                rcode, rflags, rsize, value = struct.unpack("<IIIQ", data_back)
                assert (rcode, rflags, rsize) == (code, 5, 8) and value != 0
            await still_serving(fe)
            assert port.stats.protocol_errors == {kind: 1}
            assert port.stats.connections == 1
        await ended_cleanly(port, base)


# -- control plane ---------------------------------------------------------


def region(gpa: int, size: int, uaddr: int, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uaddr, offset)


@pytest.mark.trio
async def test_control_plane_bad_inputs_are_refused_one_by_one() -> None:
    async with one_port() as port:
        base = open_fds()
        expected: dict[str, int] = {}

        async def refused(kind: str, code: FrontendRequest, payload: object, fds=()) -> None:  # type: ignore[no-untyped-def]
            assert await nack(fe, code, payload, list(fds)) != 0, kind
            expected[kind] = expected.get(kind, 0) + 1
            assert dict(port.stats.protocol_errors) == expected
            await still_serving(fe)

        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            ram = fe.ram
            r0 = ram.regions[0]
            nvrings = 2 * port.config.queue_pairs
            # Vring index out of range and bad sizes.
            await refused("bad_vring_index", F.SET_VRING_NUM, VringState(nvrings, 256))
            await refused("bad_vring_index", F.SET_VRING_BASE, VringState(255, 0))
            for num in (0, 3, 1000, 65536):
                await refused("bad_vring_num", F.SET_VRING_NUM, VringState(0, num))
            # SET_VRING_ADDR before any memory table.
            addr = VringAddr(0, 0, r0.uaddr, r0.uaddr + 0x2000, r0.uaddr + 0x1000, 0)
            assert await nack(fe, F.SET_VRING_NUM, VringState(0, 256)) == 0
            await refused("bad_vring_addr", F.SET_VRING_ADDR, addr)
            # Memory tables: overlapping, overflowing, size 0, unmappable fd.
            bad_tables = [
                (region(0, r0.size, r0.uaddr), region(0x1000, r0.size, r0.uaddr + (1 << 40))),
                (region((1 << 64) - 0x1000, r0.size, r0.uaddr),),
                (region(0, r0.size, (1 << 64) - 0x1000),),
                (region(0, 0, r0.uaddr),),
            ]
            for regions in bad_tables:
                fds = [r0.fd] * len(regions)
                await refused("bad_memory_table", F.SET_MEM_TABLE, MemoryTable(regions), fds)
            rp, wp = os.pipe()
            try:
                table = MemoryTable((region(0, 0x10000, r0.uaddr),))
                await refused("bad_memory_table", F.SET_MEM_TABLE, table, [rp])
            finally:
                os.close(rp)
                os.close(wp)
            # REM_MEM_REG of a region nobody added.
            unknown = SingleMemoryRegion(region(0x9000_0000, 0x1000, 0x1234_0000))
            await refused("bad_memory_region", F.REM_MEM_REG, unknown)
            # A good table, then rings pointing outside it or across its end.
            await fe.set_mem_table()
            outside = VringAddr(0, 0, 0x10, 0x20, 0x30, 0)
            await refused("bad_vring_addr", F.SET_VRING_ADDR, outside)
            end = r0.uaddr + r0.size
            across = VringAddr(0, 0, end - 0x100, r0.uaddr + 0x2000, r0.uaddr + 0x1000, 0)
            await refused("bad_vring_addr", F.SET_VRING_ADDR, across)
            # Rings the back-end's index stores could not do atomically.
            for desc, avail, used in ((8, 0, 0), (0, 1, 0), (0, 0, 2)):
                skewed = VringAddr(
                    0,
                    0,
                    desc=r0.uaddr + desc,
                    used=r0.uaddr + 0x2000 + used,
                    avail=r0.uaddr + 0x1000 + avail,
                    log=0,
                )
                await refused("bad_vring_addr", F.SET_VRING_ADDR, skewed)
            # IOTLB_MSG without ACCESS_PLATFORM.
            upd = IotlbMsg(0x1000, 0x1000, r0.uaddr, IotlbPerm.RW, IotlbType.UPDATE)
            await refused("iotlb_not_negotiated", F.IOTLB_MSG, upd)
        await ended_cleanly(port, base)


@pytest.mark.trio
async def test_bad_iotlb_messages_are_refused() -> None:
    async with one_port() as port:
        expected: dict[str, int] = {}
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe, iommu=True)
            await fe.set_mem_table()
            r0 = fe.ram.regions[0]

            def msg(iova: int, size: int, uaddr: int, perm: int, kind: int) -> IotlbMsg:
                return IotlbMsg(iova, size, uaddr, IotlbPerm(perm), IotlbType(kind))

            cases = [
                ("bad_iotlb_range", msg(0x1000, 0, r0.uaddr, 3, 2)),
                ("bad_iotlb_range", msg((1 << 64) - 0x1000, 0x2000, r0.uaddr, 3, 2)),
                ("bad_iotlb_range", msg(0x2000, (1 << 64) - 0x1000, 0, 0, 3)),
                ("bad_iotlb_perm", msg(0x1000, 0x1000, r0.uaddr, 0, 2)),
                ("bad_iotlb_uaddr", msg(0x1000, 0x1000, 0x10, 3, 2)),
                ("bad_iotlb_type", msg(0x1000, 0x1000, r0.uaddr, 3, 1)),
                ("bad_iotlb_type", msg(0x1000, 0x1000, r0.uaddr, 3, 4)),
            ]
            for kind, m in cases:
                assert await fe.iotlb_msg(m) != 0, (kind, m)
                expected[kind] = expected.get(kind, 0) + 1
                assert dict(port.stats.protocol_errors) == expected
            # An unknown type number and perm > 3 never decode: skipped by the framer.
            for blob, kind in (
                (struct.pack("<QQQBB6x", 0x1000, 0x1000, r0.uaddr, 3, 9), "bad_payload"),
                (struct.pack("<QQQBB6x", 0x1000, 0x1000, r0.uaddr, 7, 2), "bad_payload"),
            ):
                await fe.send_raw(raw(F.IOTLB_MSG, 1 | 8, blob))
                reply = await fe.recv_reply(F.IOTLB_MSG)
                assert reply.payload != 0
                expected[kind] = expected.get(kind, 0) + 1
                assert dict(port.stats.protocol_errors) == expected
            # The good ones still work, an end of exactly 2**64 included.
            good = msg(0x1000, 0x1000, r0.uaddr, 3, 2)
            assert await fe.iotlb_msg(good) == 0
            assert await fe.iotlb_msg(msg(0x1000, (1 << 64) - 0x1000, 0, 0, 3)) == 0
            await still_serving(fe)


@pytest.mark.trio
async def test_add_mem_reg_beyond_the_slots() -> None:
    async with one_port() as port:
        base = open_fds()
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            slots = await fe.get_max_mem_slots()
            page = 0x1000
            with GuestRam([(i * 0x10000, page) for i in range(slots + 1)]) as ram:
                for r in ram.regions[:slots]:
                    await fe.add_mem_reg(r)
                extra = SingleMemoryRegion(fe.region_payload(ram.regions[slots]))
                assert await nack(fe, F.ADD_MEM_REG, extra, [ram.regions[slots].fd]) != 0
                assert dict(port.stats.protocol_errors) == {"bad_memory_region": 1}
                # Removing one frees a slot.
                await fe.rem_mem_reg(ram.regions[0])
                await fe.add_mem_reg(ram.regions[slots])
                await still_serving(fe)
        await ended_cleanly(port, base)


@pytest.mark.trio
async def test_get_vring_base_out_of_range_closes_cleanly() -> None:
    """A request whose reply carries data cannot be nacked: the connection ends."""
    async with one_port() as port:
        async with Frontend.connect(port.config.socket) as fe:
            await negotiated(fe)
            await fe.send_raw(encode_request(F.GET_VRING_BASE, VringState(200, 0)))
            await fe.expect_closed()
        assert port.stats.protocol_errors == {"bad_vring_index": 1}
        async with Frontend.connect(port.config.socket) as fe:
            await fe.net_setup()
            assert len(await fe.send_frames(1, [frame(0)])) == 1


@pytest.mark.trio
async def test_peer_sockets_closing_mid_stream_are_survived() -> None:
    async with one_port() as port:
        base = open_fds()
        for k, cut in enumerate((1, 11, 12, 13), 1):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(port.config.socket)
            sock.sendall(raw(F.SET_FEATURES, 1, b"\0" * 8)[:cut])
            sock.close()
            await until(lambda k=k: port.stats.disconnects == k)  # type: ignore[misc]
        assert port.stats.protocol_errors == {"truncated": 4}
        assert open_fds() == base


@pytest.mark.trio
async def test_access_platform_cannot_be_dropped_under_running_rings() -> None:
    """Only a reset may take the guest's vIOMMU checks away (never a SET_FEATURES)."""
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(iommu=True)
        fe.post_rx(0, 16)
        assert len(await fe.send_frames(1, [frame(i) for i in range(4)])) == 4
        assert len(await fe.recv_frames(0, count=4, timeout=5)) == 4
        wanted = fe.features & ~VirtioFeature.ACCESS_PLATFORM
        assert await nack(fe, F.SET_FEATURES, wanted) != 0
        assert port.stats.protocol_errors == {"features_changed_while_running": 1}
        session = port.session
        assert session is not None and session.mem.iotlb is not None
        misses = port.stats.iotlb.misses
        # New buffers still go through the IOTLB (their pages miss first).
        fe.post_rx(0, 4)
        assert len(await fe.send_frames(1, [frame(i) for i in range(4, 8)])) == 4
        assert len(await fe.recv_frames(0, count=4, timeout=5)) == 4
        assert port.stats.iotlb.misses > misses


@pytest.mark.trio
async def test_features_changed_under_running_rings_rebuild_the_queues() -> None:
    """DPDK re-negotiates on a live connection: the queues follow the new features."""
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        session = port.session
        assert session is not None and session.vrings[0].rx is not None
        assert session.vrings[0].rx.mergeable
        fe.post_rx(0, 16)
        sent = [frame(i) for i in range(4)]
        assert len(await fe.send_frames(1, sent)) == 4
        got = await fe.recv_frames(0, count=4, timeout=5)
        await fe.set_features(fe.features & ~VirtioFeature.NET_MRG_RXBUF)
        rx = session.vrings[0].rx
        assert rx is not None and not rx.mergeable and session.vrings[0].running
        more = [frame(i) for i in range(4, 8)]
        assert len(await fe.send_frames(1, more)) == 4
        got += await fe.recv_frames(0, count=4, timeout=5)
        assert [g[12:] for g in got] == [f[12:] for f in sent + more]
        assert port.stats.queue_faults.total() == 0
