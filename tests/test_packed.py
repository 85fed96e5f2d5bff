"""Packed virtqueues (VIRTIO 1.1) against the running daemon, driven by the simulator.

Frames go out on a packed TX ring and come back on a packed RX ring of a
reflect port, checked by content, across the ring's end many times (wrap
counters), with and without mergeable buffers, indirect tables and
EVENT_IDX, on ring sizes that are not powers of 2, behind a vIOMMU; the
vring base carries both positions and their wrap counters across a stop and
restart; the dirty log covers the used descriptors written into the ring.
"""

from __future__ import annotations

import pytest
import trio

from protocol import VirtioFeature as VF
from tests.probe import frame, ports, session, until
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.packed import PackedRing, advance
from tests.vusim.rings import Buffer
from vhostd.packed import PackedQueue, base_halves

PACKED = DEFAULT_NET_FEATURES | VF.RING_PACKED


def ring(fe: Frontend, q: int) -> PackedRing:
    r = fe.vrings[q].ring
    assert isinstance(r, PackedRing)
    return r


async def reflect_rounds(fe: Frontend, rounds: int, per: int, *, indirect: bool = False) -> int:
    """``rounds`` bursts of ``per`` numbered frames out and back, by content and in order."""
    n = 0
    for r in range(rounds):
        sent = [frame(1000 * r + i, 60 + 61 * i) for i in range(per)]
        done = await fe.send_frames(1, sent, indirect=indirect)
        assert len(done) == per and all(c.chain is not None for c in done)
        got = await fe.recv_frames(0, count=per, timeout=5)
        assert [g[12:] for g in got] == [f[12:] for f in sent]
        n += per
    return n


CASES = {
    "plain": (PACKED, 256),
    "mergeable_off": (PACKED & ~VF.NET_MRG_RXBUF, 256),
    "event_idx": (PACKED | VF.RING_EVENT_IDX, 64),
    "indirect": (PACKED | VF.RING_INDIRECT_DESC, 64),
    "in_order": (PACKED | VF.IN_ORDER, 64),
    "size_37": (PACKED | VF.RING_EVENT_IDX, 37),
    "size_5": (PACKED, 5),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("iommu", [False, True], ids=["phys", "viommu"])
@pytest.mark.trio
async def test_packed_reflect_wraps_and_keeps_every_frame(
    case: tuple[int, int], iommu: bool
) -> None:
    features, size = case
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=iommu, features=features, queue_size=size)
        assert fe.features & VF.RING_PACKED
        s = session(p0)
        assert all(isinstance((v.tx or v.rx).queue, PackedQueue) for v in s.vrings[:2])  # type: ignore[union-attr]
        fe.post_rx(0, min(size, 64))
        per = max(1, min(size // 2, 16))
        # Enough rounds that both rings go round several times (wrap flips).
        rounds = max(4, 3 * size // per)
        n = await reflect_rounds(fe, rounds, per, indirect=bool(features & VF.RING_INDIRECT_DESC))
        assert p0.stats.queue(1).packets == n
        assert p0.stats.queue(0).packets == n
        assert not p0.stats.queue_faults and not p0.stats.protocol_errors


@pytest.mark.trio
async def test_packed_vring_base_carries_positions_and_wrap_counters() -> None:
    """GET_VRING_BASE reports where each ring stands (both halves); a restart resumes there."""
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=PACKED, queue_size=24)
        fe.post_rx(0, 16)
        await reflect_rounds(fe, 5, 7)  # 35 chains each way on rings of 24: one wrap
        assert ring(fe, 1).last_used == 11  # index 11, wrap counter 0
        bases = await fe.stop()
        for q in (0, 1):
            assert bases[q] == 11 | 11 << 16, (q, hex(bases[q]))
        # Resume from the reported bases: the rings go on where they stood.
        for q in (0, 1):
            await fe.start_ring(q, bases[q])
            await fe.set_vring_enable(q, True)
        await reflect_rounds(fe, 6, 7)
        assert ring(fe, 1).last_used == advance(11, 42, 24)
        assert await fe.get_vring_base(1) == advance(11, 42, 24) * 0x10001
        assert not p0.stats.queue_faults


@pytest.mark.trio
async def test_packed_ring_started_mid_lap() -> None:
    """A ring handed over at index 20 of 24 in wrap 0 (a migrated ring) runs from there."""
    async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=PACKED, queue_size=24)
        await fe.get_vring_base(1)
        fe.add_ring(1, 24, start=20)  # wrap counter 0: the ring went round once already
        await fe.start_ring(1)
        await fe.set_vring_enable(1, True)
        done = await fe.send_frames(1, [frame(i) for i in range(30)])
        assert len(done) == 30
        assert p0.stats.queue(1).packets == 30
        assert ring(fe, 1).last_used == 2  # 20 + 30 - 48, wrap counter 0 again
        assert await fe.get_vring_base(1) == 2 | 2 << 16


def post_tx(fe: Frontend, q: int, frames: list[bytes]) -> None:
    r = ring(fe, q)
    for f in frames:
        gpa = fe.ram.alloc(12 + len(f), 64)
        fe.ram.write(gpa, bytes(12) + f)
        r.post([Buffer(gpa, 12 + len(f))])
    fe.kick(q)


@pytest.mark.trio
async def test_packed_interrupts_follow_the_driver_event_area() -> None:
    """Disabled: no interrupt; EVENT_IDX desc mode: one when the named position is used."""
    async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=PACKED | VF.RING_EVENT_IDX, queue_size=32)
        r = ring(fe, 1)
        stats = p0.stats.queue(1)
        r.suppress_interrupts(True)
        before = stats.interrupts
        post_tx(fe, 1, [frame(i) for i in range(4)])
        await until(lambda: stats.packets == 4)
        await trio.sleep(0.05)
        assert stats.interrupts == before and stats.suppressed > 0
        assert not fe.call_pending(1)
        # Ask for an interrupt when the used descriptor 6 positions on is written.
        r.set_used_event(advance(r.last_used + 4, 6, 32))
        post_tx(fe, 1, [frame(i) for i in range(3)])
        await until(lambda: stats.packets == 7)
        await trio.sleep(0.05)
        assert not fe.call_pending(1)
        post_tx(fe, 1, [frame(i) for i in range(4)])
        await until(lambda: stats.packets == 11)
        assert await fe.wait_call(1, 2.0)
        assert stats.interrupts == before + 1


@pytest.mark.trio
async def test_packed_kicks_follow_the_device_event_area() -> None:
    """Without EVENT_IDX the device enables kicks when idle; with it, names its next position."""
    for features in (PACKED, PACKED | VF.RING_EVENT_IDX):
        async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
            await fe.net_setup(features=features, queue_size=16)
            await fe.send_frames(1, [frame(i) for i in range(5)])
            r = ring(fe, 1)
            if features & VF.RING_EVENT_IDX:
                # Idle again: kick me for a chain at the next position, not before.
                await until(lambda r=r: r.device_event() == (r.next_avail, 2))
            else:
                await until(lambda r=r: r.device_event()[1] == 0)
            old = r.next_avail
            post_tx(fe, 1, [frame(9)])
            assert r.needs_kick(old)
            await until(lambda p0=p0: p0.stats.queue(1).packets == 6)


def test_base_halves() -> None:
    assert base_halves(0x8000) == (0x8000, 0x8000)  # DPDK virtio-user: avail half only
    assert base_halves(0x8005 | 0x0003 << 16) == (0x8005, 0x0003)
    assert base_halves(0) == (0, 0)


@pytest.mark.trio
async def test_split_ring_when_the_driver_declines_packed() -> None:
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=DEFAULT_NET_FEATURES)
        s = session(p0)
        assert s.offered_features & VF.RING_PACKED and not s.features & VF.RING_PACKED
        assert all(not isinstance((v.tx or v.rx).queue, PackedQueue) for v in s.vrings[:2])  # type: ignore[union-attr]
        fe.post_rx(0, 8)
        await reflect_rounds(fe, 2, 4)


@pytest.mark.trio
async def test_packed_stale_base_resumes_where_the_ring_stands() -> None:
    """QEMU 7.2 after a back-end restart: SET_VRING_BASE says 0x8000, the rings are further on."""
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=PACKED, queue_size=32)
        fe.post_rx(0, 32)  # the whole RX ring: used buffers are reposted in the next lap
        await reflect_rounds(fe, 3, 5)  # 15 chains each way
        assert ring(fe, 0).next_avail == 15  # index 15 of the next lap (wrap counter 0)
        await fe.stop()
        for q in (0, 1):
            await fe.start_ring(q, 0x8000)  # the first base again: both rings passed it
            await fe.set_vring_enable(q, True)
        await reflect_rounds(fe, 5, 5)  # 25 more: across the end of the rings
        assert await fe.get_vring_base(1) == advance(0x8000, 40, 32) * 0x10001
        assert not p0.stats.queue_faults


@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
@pytest.mark.trio
async def test_packed_rx_backlog_waits_for_buffers_and_keeps_order(event_idx: bool) -> None:
    """More frames than posted RX buffers: the rest wait, then arrive in order as buffers come."""
    features = PACKED | (VF.RING_EVENT_IDX if event_idx else 0)
    async with ports("reflect") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(features=features, queue_size=16)
        fe.post_rx(0, 3)
        sent = [frame(i, 60 + 40 * i) for i in range(12)]
        await fe.send_frames(1, sent)
        got = await fe.recv_frames(0, count=12, timeout=5)  # refills as it collects
        assert [g[12:] for g in got] == [f[12:] for f in sent]
        assert p0.stats.queue(0).packets == 12 and p0.stats.queue(0).dropped == 0
