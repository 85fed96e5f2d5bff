"""Connections coming and going: nothing leaks, rings stop and resume where they should."""

from __future__ import annotations

import gc

import pytest
import trio

from protocol import DeviceStatus, VirtioFeature
from tests.probe import frame, memfd_maps, open_fds, ports, session, until
from tests.vusim.frontend import Frontend, Vring
from tests.vusim.guestram import GuestRam
from tests.vusim.rings import Buffer
from vhostd.memory import lingering_mappings


@pytest.mark.trio
async def test_200_connections_leave_no_fd_and_no_mapping_behind() -> None:
    async with ports("sink") as (_, (port,)):
        gc.collect()
        fds, maps, lingering = open_fds(), memfd_maps(), lingering_mappings()
        for i in range(200):
            async with Frontend.connect(port.config.socket) as fe:
                await fe.net_setup(queue_pairs=2, queue_size=64)
                assert memfd_maps() > maps
                if i % 50 == 0:
                    assert len(await fe.send_frames(1, [frame(i)])) == 1
            await until(lambda: port.session is None)
        assert port.stats.connections == port.stats.disconnects == 200
        assert (open_fds(), memfd_maps()) == (fds, maps)
        gc.collect()
        assert lingering_mappings() == lingering, "a view outlived its session's memory"
        assert not port.stats.protocol_errors


@pytest.mark.trio
async def test_disconnect_mid_traffic() -> None:
    async with ports("reflect") as (_, (port,)):
        gc.collect()
        fds, maps, lingering = open_fds(), memfd_maps(), lingering_mappings()
        async with Frontend.connect(port.config.socket) as fe:
            await fe.net_setup()
            fe.post_rx(0, 64)
            ring = fe.vrings[1].ring
            for i in range(100):
                gpa = fe.ram.alloc(12 + 60)
                fe.ram.write(gpa, bytes(12) + frame(i))
                ring.post([Buffer(gpa, 72)])
            fe.kick(1)
            await trio.sleep(0)
        await until(lambda: port.session is None)
        assert (open_fds(), memfd_maps()) == (fds, maps)
        gc.collect()
        assert lingering_mappings() == lingering, "a view outlived its session's memory"
        async with Frontend.connect(port.config.socket) as fe:
            await fe.net_setup()
            fe.post_rx(0, 8)
            assert len(await fe.send_frames(1, [frame(i) for i in range(5)])) == 5
            assert len(await fe.recv_frames(0, count=5)) == 5


@pytest.mark.trio
async def test_get_vring_base_reports_next_avail_and_stops_the_ring() -> None:
    async with ports("sink") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        assert len(await fe.send_frames(1, [frame(i) for i in range(10)])) == 10
        assert await fe.get_vring_base(1) == 10
        assert not session(port).vrings[1].started
        ring = fe.vrings[1].ring
        gpa = fe.ram.alloc(72)
        fe.ram.write(gpa, bytes(12) + frame(99))
        ring.post([Buffer(gpa, 72)])
        fe.kick(1)
        await trio.sleep(0.05)
        assert ring.used_idx() == 10
        assert port.stats.queue(1).packets == 10
        # A never-started ring reports its base.
        await fe.set_vring_base(1, 10)
        assert await fe.get_vring_base(1) == 10


@pytest.mark.trio
async def test_reset_device_stops_everything_and_setup_works_again() -> None:
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        fe.post_rx(0, 8)
        assert len(await fe.send_frames(1, [frame(0)])) == 1
        await fe.reset_device()
        assert await fe.get_status() == 0  # also: RESET_DEVICE was handled
        s = session(port)
        assert not any(v.started or v.kick is not None for v in s.vrings)
        # Everything from scratch on the same connection, fresh rings.
        await fe.net_setup()
        fe.post_rx(0, 8)
        assert len(await fe.send_frames(1, [frame(i) for i in range(3)])) == 3
        assert len(await fe.recv_frames(0, count=3)) == 3
        assert await fe.get_status() & DeviceStatus.DRIVER_OK
        assert port.stats.queue_faults.total() == 0


@pytest.mark.parametrize("peer", ["qemu", "dpdk"])
@pytest.mark.trio
async def test_reconnect_resumes_at_the_used_index(peer: str) -> None:
    """QEMU sends SET_VRING_BASE = used idx, DPDK sends 0: both must resume exactly."""
    ram = GuestRam([(0, 8 << 20)])
    keep_open = ram.close
    ram.close = lambda: None  # type: ignore[method-assign]
    try:
        async with ports("sink") as (_, (port,)):
            async with Frontend.connect(port.config.socket, ram=ram) as fe:
                await fe.net_setup()
                assert len(await fe.send_frames(1, [frame(i) for i in range(300)])) == 300
                old = fe.vrings[1]
            await until(lambda: port.session is None)
            ring = old.ring
            assert ring.used_idx() == 300
            async with Frontend.connect(port.config.socket, ram=ram) as fe:
                await fe.set_owner()
                offered = await fe.get_features()
                await fe.set_protocol_features(await fe.get_protocol_features())
                await fe.set_features(
                    offered & (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
                )
                await fe.set_mem_table()
                fe.vrings[1] = Vring(ring, fe._eventfd(), fe._eventfd(), fe._eventfd())
                await fe.start_ring(1, base=ring.used_idx() if peer == "qemu" else 0)
                await fe.set_vring_enable(1)
                assert len(await fe.send_frames(1, [frame(i) for i in range(20)])) == 20
                assert ring.used_idx() == 320
                assert port.stats.queue(1).packets == 320
                assert await fe.get_vring_base(1) == 320
    finally:
        ram.close = keep_open  # type: ignore[method-assign]
        ram.close()


@pytest.mark.trio
async def test_mrg_rxbuf_splits_frames_over_small_buffers() -> None:
    """Differential: what the guest reassembles from num_buffers is what was sent."""
    buf = 256
    sizes = [60, 243, 244, 245, 500, 512, 1000, 1514, 61, 1514]
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        assert fe.features & VirtioFeature.NET_MRG_RXBUF
        fe.post_rx(0, 128, buf)
        frames = [frame(i, n) for i, n in enumerate(sizes)]
        assert len(await fe.send_frames(1, frames)) == len(frames)
        got = await fe.recv_frames(0, count=len(frames), timeout=5)
        assert [(g[:6], g[12:]) for g in got] == [(f[6:12], f[12:]) for f in frames]
        chains = sum(-(-(12 + n) // buf) for n in sizes)
        assert fe.vrings[0].ring.used_idx() == chains
        assert port.stats.queue(0).packets == len(frames)
        assert port.stats.queue(0).dropped == 0


@pytest.mark.trio
async def test_second_backend_channel_replaces_the_first() -> None:
    async with ports("sink") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(iommu=True)
        first = fe.backend
        await fe.set_backend_req_fd()
        with trio.fail_after(5):
            assert first is not None
            await fe.backend_closed.wait()
        assert len(await fe.send_frames(1, [frame(i) for i in range(5)])) == 5
        assert port.stats.connections == 1 and port.session is not None
        assert not port.stats.protocol_errors
