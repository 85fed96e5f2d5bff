"""The device IOTLB of the running daemon, driven by a front-end with a vIOMMU.

Each test asserts what a guest could observe: frames delivered or refused,
the back-end channel's MISS/ACCESS_FAIL messages, the port's counters, and
that guest memory outside the guest's IOMMU mappings was neither written
(canaries) nor read (poison).
"""

from __future__ import annotations

import struct

import pytest
import trio

from protocol import (
    DeviceStatus,
    FrontendRequest,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    VirtioFeature,
    encode_request,
)
from tests.probe import check_port_works, frame, ports, session, until
from tests.vusim import badrings
from tests.vusim.dma import IommuDma
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.guestram import PAGE
from tests.vusim.net import post_rx, recv_frames
from tests.vusim.rings import F_WRITE
from tests.vusim.viommu import IOVA_END, LAZY_FLUSH_IOVA, MissMode, VIommu

UNMAPPED_IOVA = 0x6_0000_0000
"""No IOVA the simulator hands out (0xd0000000 upwards) comes near it."""


def misses_for(fe: Frontend, iova: int) -> int:
    page = iova & ~(PAGE - 1)
    return sum(1 for m in fe.viommu.misses() if m.iova & ~(PAGE - 1) == page)


def access_fails(fe: Frontend) -> list[IotlbMsg]:
    return [
        m.payload
        for m in fe.backend_messages
        if isinstance(m.payload, IotlbMsg) and m.payload.type == IotlbType.ACCESS_FAIL
    ]


@pytest.mark.trio
async def test_unmapped_descriptor_stops_only_its_queue() -> None:
    async with (
        ports("sink", "sink", miss_timeout=1.0) as (_, (p0, p1)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=2, iommu=True)
        stats = p0.stats
        # Warm up: queue 1 works (rings and buffers translated through misses).
        assert len(await fe.send_frames(1, [frame(0)])) == 1
        ring = fe.vrings[1].ring
        badrings.single(ring, UNMAPPED_IOVA + 0x10, 64)
        fe.kick(1)
        await until(lambda: misses_for(fe, UNMAPPED_IOVA) == 1)
        t_miss = trio.current_time()
        # While the miss is outstanding: the main channel is served,
        # another queue of the same port moves frames through misses
        # (UPDATEs arrive while queue 1 waits), and nothing failed yet.
        status = await fe.get_status()
        assert not status & DeviceStatus.DEVICE_NEEDS_RESET
        assert len(await fe.send_frames(3, [frame(i) for i in range(20)])) == 20
        assert stats.iotlb_miss_timeouts == 0
        assert stats.queue_faults.total() == 0
        # The bound passes: ACCESS_FAIL once, queue 1 stopped, NEEDS_RESET.
        await until(lambda: stats.queue_faults["access_error"] == 1)
        assert trio.current_time() - t_miss >= 0.9
        await until(lambda: access_fails(fe))
        [fail] = access_fails(fe)
        assert fail.iova == UNMAPPED_IOVA + 0x10
        assert misses_for(fe, UNMAPPED_IOVA) == 1, "MISS repeated for an outstanding page"
        assert stats.iotlb_miss_timeouts == 1
        assert stats.access_failures == 1
        assert fe.err_pending(1)
        assert await fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
        assert session(p0).vrings[1].failed is not None
        # Nothing more is taken from queue 1; queue 3 and the other port go on.
        tx1 = stats.queue(1).packets
        badrings.single(ring, UNMAPPED_IOVA + 0x2000, 64)
        fe.kick(1)
        assert len(await fe.send_frames(3, [frame(i) for i in range(5)])) == 5
        assert stats.queue(1).packets == tx1
        assert misses_for(fe, UNMAPPED_IOVA + 0x2000) == 0
        await check_port_works(p1)
        assert p1.stats.queue_faults.total() == 0


@pytest.mark.trio
async def test_half_mapped_tx_buffer_is_refused_and_nothing_leaks() -> None:
    async with (
        ports("reflect", miss_timeout=0.5) as (_, (p0,)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(iommu=True)
        post_rx(fe, 0, 16)
        assert len(await fe.send_frames(1, [frame(0)])) == 1
        assert len(await fe.recv_frames(0, count=1)) == 1
        # A 100-byte frame across a page boundary; only the first page is
        # mapped, the second is poison the device must never read.
        gpa = fe.ram.poison(2 * PAGE)
        start = gpa + PAGE - 50
        fe.ram.write(start, bytes(12) + frame(7, 88)[:50])
        iova = fe.dma.iovas.take(2 * PAGE)
        fe.viommu.map(iova, gpa, PAGE, IotlbPerm.READ)
        badrings.single(fe.vrings[1].ring, iova + PAGE - 50, 100)
        fe.kick(1)
        stats = p0.stats
        await until(lambda: stats.queue_faults["access_error"] == 1)
        await until(lambda: access_fails(fe))
        assert [m.iova for m in access_fails(fe)] == [iova + PAGE]
        assert misses_for(fe, iova) == 1 and misses_for(fe, iova + PAGE) == 1
        assert stats.iotlb_miss_timeouts == 1
        assert stats.queue(1).packets == 1
        got = await fe.recv_frames(0, timeout=0.1)
        assert got == []
        assert not any(fe.ram.leaked_poison(f) for f in got)
        assert stats.queue(0).packets == 1


@pytest.mark.parametrize("translated", [False, True], ids=["via-miss", "cached"])
@pytest.mark.trio
async def test_rx_buffer_mapped_read_only_is_refused_unwritten(translated: bool) -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(queue_pairs=2, iommu=True)
        stats = p0.stats
        rx_before = 0
        if translated:
            # Rings already translated and the RO entry already in the
            # IOTLB: the frame meets the denial on the delivery fast path.
            post_rx(fe, 0, 1)
            assert len(await fe.send_frames(1, [frame(0, src=3)])) == 1
            assert len(await recv_frames(fe, 0, count=1, refill=False)) == 1
            rx_before = 1
        fe.ram.arm_canary()
        gpa = fe.ram.alloc(2048, 64)
        iova = fe.dma.map_buffer(gpa, 2048, IotlbPerm.READ)
        if translated:
            await fe.iotlb_update(iova, 2048)
        # The descriptor says device-writable; the guest's IOMMU says read-only.
        badrings.single(fe.vrings[0].ring, iova, 2048, F_WRITE)
        fe.kick(0)
        # TX from a read-only mapping is fine; its reflection hits the RO buffer.
        assert len(await fe.send_frames(1, [frame(1, src=3)])) == 1
        await until(lambda: stats.queue_faults["iotlb_denied"] == 1)
        assert stats.blocked_accesses == 1
        assert stats.queue(0).dropped == 1
        await until(lambda: access_fails(fe))
        assert stats.access_failures == 1
        [fail] = access_fails(fe)
        assert fail.iova == iova and fail.perm == IotlbPerm.WRITE
        assert fe.err_pending(0)
        assert await fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
        assert stats.queue(0).packets == rx_before
        assert fe.vrings[0].ring.used_idx() == rx_before
        assert fe.ram.canary_violations() == []
        # Queue pair 1 still reflects (frames hash by MAC; only one RX ring
        # is left, so every frame lands on queue 2).
        post_rx(fe, 2, 8)
        assert len(await fe.send_frames(3, [frame(i) for i in range(4)])) == 4
        assert len(await fe.recv_frames(2, count=4)) == 4
        assert fe.ram.canary_violations() == []


@pytest.mark.trio
async def test_tx_buffers_mapped_read_only_are_fine() -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=True)
        fe.ram.arm_canary()
        post_rx(fe, 0, 64)
        frames = [frame(i) for i in range(50)]
        assert len(await fe.send_frames(1, frames)) == 50
        got = await fe.recv_frames(0, count=50)
        assert [g[12:] for g in got] == [f[12:] for f in frames]
        stats = p0.stats
        assert stats.blocked_accesses == stats.access_failures == 0
        assert stats.queue_faults.total() == 0
        # The device learnt the TX buffers as read-only entries and used them.
        ro = [e for e in fe.viommu.sent(IotlbType.UPDATE) if e.msg.perm == IotlbPerm.READ]
        assert len(ro) >= 50 and all(e.ack == 0 for e in ro)
        assert fe.ram.canary_violations() == []


def ring_span(fe: Frontend, q: int) -> list[tuple[int, int]]:
    """(iova, size) of queue ``q``'s three rings."""
    r = fe.vrings[q].ring
    return [(r.desc_addr, r.desc_bytes), (r.avail_addr, r.avail_bytes), (r.used_addr, r.used_bytes)]


@pytest.mark.trio
async def test_rings_invalidated_under_traffic_are_retranslated_without_loss() -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=True)
        fe.ram.arm_canary()
        post_rx(fe, 0, 128)
        n = 300
        frames = [frame(i) for i in range(n)]
        got: list[bytes] = []
        invalidations = 0

        async def receiver() -> None:
            got.extend(await fe.recv_frames(0, timeout=40, count=n))

        async def invalidator(done: trio.Event) -> None:
            nonlocal invalidations
            while not done.is_set():
                for q in (0, 1):
                    for iova, size in ring_span(fe, q):
                        assert await fe.iotlb_invalidate(iova, size) == 0
                invalidations += 1
                await trio.sleep(0.02)  # each round costs every ring a MISS round trip

        stats = p0.stats
        misses_before = stats.iotlb_miss_sent
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(receiver)
            nursery.start_soon(invalidator, done)
            sent = await fe.send_frames(1, frames, timeout=40)
            await until(lambda: len(got) == n, timeout=40)
            done.set()
        assert len(sent) == n
        assert [g[12:] for g in got] == [f[12:] for f in frames], "lost or reordered"
        assert invalidations >= 3
        # Each round of invalidations cost the rings fresh misses.
        assert stats.iotlb_miss_sent - misses_before >= invalidations
        assert stats.queue(1).packets == stats.queue(0).packets == n
        assert stats.queue(0).dropped == stats.queue(1).dropped == 0
        assert stats.queue_faults.total() == 0
        assert fe.ram.canary_violations() == []


@pytest.mark.trio
async def test_miss_never_answered_stops_the_rings_not_the_daemon() -> None:
    async with (
        ports("sink", "sink", miss_timeout=0.2) as (_, (p0, p1)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        fe.viommu.policy.mode = MissMode.NEVER
        await fe.net_setup(iommu=True)
        stats = p0.stats
        await until(lambda: stats.queue_faults["access_error"] == 2)
        # One MISS per ring (its descriptor table), never repeated.
        misses = fe.viommu.misses()
        assert sorted(m.iova for m in misses) == sorted(fe.vrings[q].ring.desc_addr for q in (0, 1))
        await until(lambda: len(access_fails(fe)) == 2)
        assert stats.iotlb_miss_timeouts == stats.access_failures == 2
        assert fe.err_pending(0) and fe.err_pending(1)
        assert await fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
        await check_port_works(p1)


@pytest.mark.trio
async def test_lazy_flush_to_2_64_invalidates_everything_and_traffic_recovers() -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=True)
        # Put rings and buffers above 0xfef00000, where Linux's lazy-mode
        # flush-all [0xfef00000, 2**64) reaches, as a real guest's IOVAs are.
        assert isinstance(fe.dma, IommuDma)
        fe.dma.iovas._next = 0x1_0000_0000
        for q in (0, 1):
            fe.add_ring(q)
            await fe.start_ring(q)
            await fe.set_vring_enable(q)
        assert await fe.iotlb_invalidate(0, LAZY_FLUSH_IOVA) == 0
        post_rx(fe, 0, 64)
        assert len(await fe.send_frames(1, [frame(i) for i in range(20)])) == 20
        assert len(await fe.recv_frames(0, count=20)) == 20
        iotlb = session(p0).iotlb
        assert iotlb is not None
        assert len(iotlb) > 0 and p0.stats.iotlb_entries == len(iotlb)
        flush = VIommu.lazy_flush_msg()
        assert flush.iova + flush.size == IOVA_END
        assert await fe.iotlb_msg(flush) == 0
        assert len(iotlb) == 0 and p0.stats.iotlb_entries == 0
        misses = p0.stats.iotlb_miss_sent
        assert len(await fe.send_frames(1, [frame(i) for i in range(20)])) == 20
        assert len(await fe.recv_frames(0, count=20)) == 20
        assert p0.stats.iotlb_miss_sent > misses
        # One byte past 2**64 is refused, and the daemon goes on.
        bad = IotlbMsg(flush.iova + 1, flush.size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE)
        assert await fe.iotlb_msg(bad) != 0
        assert p0.stats.protocol_errors["bad_iotlb_range"] == 1
        assert len(await fe.send_frames(1, [frame(1)])) == 1
        assert p0.stats.queue_faults.total() == 0


@pytest.mark.trio
async def test_iotlb_flushed_on_new_memory_table_and_on_get_vring_base() -> None:
    async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=True)
        iotlb = session(p0).iotlb
        assert iotlb is not None
        assert len(await fe.send_frames(1, [frame(i) for i in range(10)])) == 10
        assert len(iotlb) > 0
        await fe.set_mem_table()
        assert len(iotlb) == 0 and p0.stats.iotlb_entries == 0
        # The rings were kicked: they come back through misses.
        assert len(await fe.send_frames(1, [frame(i) for i in range(10)])) == 10
        assert len(iotlb) > 0
        assert await fe.get_vring_base(1) == 20
        assert len(iotlb) == 0 and p0.stats.iotlb_entries == 0
        assert p0.stats.queue(1).packets == 20


@pytest.mark.trio
async def test_delayed_misses_lose_no_frame_in_either_direction() -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        fe.viommu.policy.mode = MissMode.DELAY
        fe.viommu.policy.delay = 0.002
        await fe.net_setup(iommu=True)
        post_rx(fe, 0, 200)
        n = 400
        frames = [frame(i) for i in range(n)]
        got: list[bytes] = []

        async def receiver() -> None:
            got.extend(await fe.recv_frames(0, timeout=15, count=n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            assert len(await fe.send_frames(1, frames, timeout=15)) == n
        assert [g[12:] for g in got] == [f[12:] for f in frames]
        stats = p0.stats
        assert stats.queue(1).packets == stats.queue(0).packets == n
        assert stats.totals("rx").dropped == stats.totals("tx").dropped == 0
        assert stats.iotlb_miss_timeouts == 0
        # Every page was asked for once while its MISS was outstanding.
        pages = [m.iova & ~(PAGE - 1) for m in fe.viommu.misses()]
        assert len(pages) == len(set(pages))


@pytest.mark.trio
async def test_100k_mappings_then_traffic() -> None:
    # A port whose IOTLB may hold them all (the default cap is far lower).
    async with (
        ports("reflect", iotlb_entries=1 << 17) as (_, (p0,)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(iommu=True)
        count = 100_000
        base = 0x40_0000_0000
        uaddr = fe.ram.regions[0].uaddr
        # Encoded once, then patched (the encoder is not what is under test).
        # Only the last asks for an ack: it comes after all the others were
        # handled; a refused one would show in protocol_errors.
        one = bytearray(
            encode_request(
                FrontendRequest.IOTLB_MSG,
                IotlbMsg(0, PAGE, 0, IotlbPerm.RW, IotlbType.UPDATE),
            )
        )
        blob = bytearray()
        for i in range(count):
            struct.pack_into("<QQQ", one, 12, base + i * PAGE, PAGE, uaddr + (i % 512) * PAGE)
            blob += one
        with trio.fail_after(30):
            await fe.send_raw(bytes(blob))
            last = IotlbMsg(base - PAGE, PAGE, uaddr, IotlbPerm.RW, IotlbType.UPDATE)
            assert await fe.iotlb_msg(last) == 0
        assert not p0.stats.protocol_errors
        iotlb = session(p0).iotlb
        assert iotlb is not None and len(iotlb) >= count
        assert p0.stats.iotlb_entries >= count
        post_rx(fe, 0, 64)
        frames = [frame(i) for i in range(50)]
        assert len(await fe.send_frames(1, frames)) == 50
        got = await fe.recv_frames(0, count=50)
        assert [g[12:] for g in got] == [f[12:] for f in frames]
        assert p0.stats.queue_faults.total() == 0


@pytest.mark.trio
async def test_update_that_arrives_while_the_miss_is_being_sent_is_not_lost() -> None:
    """QEMU may answer before the daemon's send of the MISS has returned."""
    async with (
        ports("sink", miss_timeout=10.0) as (_, (p0,)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(iommu=True)
        assert len(await fe.send_frames(1, [frame(0)])) == 1
        backend = session(p0).backend
        assert backend is not None
        send = backend.send_iotlb

        async def slow_return(kind: IotlbType, iova: int, perm: IotlbPerm) -> bool:
            ok = await send(kind, iova, perm)
            await trio.sleep(0.05)  # the UPDATE is handled meanwhile
            return ok

        backend.send_iotlb = slow_return  # type: ignore[method-assign]
        with trio.fail_after(3):
            assert len(await fe.send_frames(1, [frame(i) for i in range(5)])) == 5
        assert p0.stats.iotlb_miss_timeouts == 0
        assert p0.stats.iotlb_miss_time.count > 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.trio
async def test_a_queue_that_misses_asks_for_the_next_chains_pages_at_once(packed: bool) -> None:
    """One MISS round trip per burst, not per packet: the next chains' pages go out together
    (packed rings: the chains past one that missed are found from their flags)."""
    async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        fe.viommu.policy.mode = MissMode.DELAY
        fe.viommu.policy.delay = 0.05
        layout = VirtioFeature.RING_PACKED if packed else 0
        await fe.net_setup(iommu=True, features=DEFAULT_NET_FEATURES | layout)
        assert bool(fe.features & VirtioFeature.RING_PACKED) == packed
        await fe.send_frames(1, [frame(0)], timeout=15)  # rings translated
        start = len(fe.viommu.log)
        n = 16
        assert len(await fe.send_frames(1, [frame(i) for i in range(n)], timeout=15)) == n
        events = fe.viommu.log[start:]
        first_update = next(i for i, e in enumerate(events) if e.msg.type == IotlbType.UPDATE)
        asked_before = {
            e.msg.iova & ~(PAGE - 1) for e in events[:first_update] if e.msg.type == IotlbType.MISS
        }
        assert len(asked_before) == n, "every posted buffer's page asked for in one go"
        assert p0.stats.queue(1).packets == n + 1
        assert p0.stats.iotlb_miss_timeouts == 0


@pytest.mark.trio
async def test_a_dropped_look_ahead_miss_does_not_stop_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The front-end never answers one look-ahead MISS (as QEMU when the page is unmapped by
    the time it looks); when the queue gets to that chain it asks for itself, and the
    answer to its own MISS lets the frame through: no timeout, no stopped queue."""
    async with (
        ports("sink", miss_timeout=0.5) as (_, (p0,)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(iommu=True)
        await fe.send_frames(1, [frame(0)], timeout=15)  # rings translated
        answer = VIommu.answer_miss
        asked: list[int] = []

        def drop_first_look_ahead(self: VIommu, iova: int, perm: IotlbPerm) -> IotlbMsg | None:
            page = iova & ~(PAGE - 1)
            asked.append(page)
            if len(set(asked)) == 2 and asked.count(page) == 1:
                return None  # the second page asked for: the look-ahead's
            return answer(self, iova, perm)

        monkeypatch.setattr(VIommu, "answer_miss", drop_first_look_ahead)
        done = await fe.send_frames(1, [frame(1), frame(2)], timeout=15)
        assert len(done) == 2
        dropped = [page for page in set(asked) if asked.count(page) == 2]
        assert len(dropped) == 1, asked  # asked ahead, dropped, asked again by the queue
        assert p0.stats.queue(1).packets == 3
        assert p0.stats.iotlb_miss_timeouts == 0
        assert p0.stats.queue_faults.total() == 0
