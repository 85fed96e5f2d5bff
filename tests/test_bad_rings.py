"""Malicious guest rings against the running daemon.

Each bad ring must stop only its own queue: a ``queue_faults[kind]`` count,
DEVICE_NEEDS_RESET in the status, the queue's err eventfd signalled, no
guest memory written outside the used rings (canaries), while the other
queue pair, another port and the daemon go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from protocol import DeviceStatus, VirtioFeature
from tests.probe import check_port_works, frame, ports, session, until
from tests.vusim import badpacked, badrings
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.net import post_rx, recv_frames
from tests.vusim.packed import PackedRing
from tests.vusim.rings import Desc, SplitRing

INDIRECT = DEFAULT_NET_FEATURES | VirtioFeature.RING_INDIRECT_DESC
GAP_GPA = 0x4000_0000
"""Inside the hole between the simulator's two RAM regions."""


@dataclass(frozen=True)
class BadRing:
    build: Callable[[SplitRing], object]
    fault: str
    queue: int = 1
    features: int = INDIRECT
    iommu: bool = False


def _indirect_unmapped(ring: SplitRing) -> None:
    [head] = ring.take_descs(1)
    ring.write_desc(head, Desc(GAP_GPA, 32, badrings.F_INDIRECT, 0))
    ring.push_heads([head])


def _past_2_64(ring: SplitRing) -> None:
    badrings.single(ring, (1 << 64) - 16, 64)


CASES = {
    "next_out_of_range": BadRing(badrings.next_out_of_range, "next_out_of_range"),
    "loop": BadRing(badrings.loop, "chain_loop_or_too_long"),
    "too_long_chain": BadRing(badrings.too_long_chain, "chain_loop_or_too_long"),
    "head_out_of_range": BadRing(badrings.head_out_of_range, "head_out_of_range"),
    "avail_jump": BadRing(badrings.avail_jump, "avail_index_jump"),
    "indirect_len0": BadRing(badrings.indirect_len0, "indirect_bad_length"),
    "indirect_len_unaligned": BadRing(badrings.indirect_len_unaligned, "indirect_bad_length"),
    "indirect_nested": BadRing(badrings.indirect_nested, "indirect_nested"),
    "indirect_loop": BadRing(badrings.indirect_loop, "chain_loop_or_too_long"),
    "indirect_unmapped": BadRing(_indirect_unmapped, "address_unmapped"),
    "indirect_not_negotiated": BadRing(
        badrings.indirect_len_unaligned, "indirect_not_negotiated", features=DEFAULT_NET_FEATURES
    ),
    "unmapped": BadRing(lambda r: badrings.single(r, GAP_GPA, 64), "address_unmapped"),
    "crossing_regions": BadRing(badrings.crossing_regions, "address_unmapped"),
    "tx_writable": BadRing(
        lambda r: badrings.wrong_direction(r, tx=True), "wrong_descriptor_direction"
    ),
    "rx_read_only": BadRing(
        lambda r: badrings.wrong_direction(r, tx=False), "wrong_descriptor_direction", queue=0
    ),
    "iova_past_2_64": BadRing(_past_2_64, "address_unmapped", iommu=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.trio
async def test_bad_ring_stops_only_its_queue(case: BadRing) -> None:
    async with (
        ports("reflect", "sink") as (_, (p0, p1)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=2, iommu=case.iommu, features=case.features)
        stats = p0.stats
        q = case.queue
        # Queue pair 0 works before the bad ring: one frame out and back in.
        post_rx(fe, 0, 1)
        assert len(await fe.send_frames(1, [frame(0, src=3)])) == 1
        assert len(await recv_frames(fe, 0, count=1, refill=False)) == 1
        fe.ram.arm_canary()
        used_before = fe.vrings[q].ring.used_idx()
        packets_before = stats.queue(q).packets
        case.build(fe.vrings[q].ring)
        fe.kick(q)
        if q == 0:
            # An RX ring is walked when a frame arrives for it.
            await fe.send_frames(1, [frame(1, src=3)])
        await until(lambda: stats.queue_faults.total() == 1)
        assert dict(stats.queue_faults) == {case.fault: 1}
        assert session(p0).vrings[q].failed is not None
        assert fe.err_pending(q)
        assert await fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
        assert fe.vrings[q].ring.used_idx() == used_before
        assert stats.queue(q).packets == packets_before
        # A later kick does not touch the stopped queue again.
        fe.kick(q)
        await trio.sleep(0.01)
        assert stats.queue_faults.total() == 1
        # The other queue pair reflects; the other port serves.
        post_rx(fe, 2, 8)
        assert len(await fe.send_frames(3, [frame(i) for i in range(4)])) == 4
        assert len(await fe.recv_frames(2, count=4)) == 4
        assert fe.ram.canary_violations() == []
        await check_port_works(p1, iommu=case.iommu)
        assert p1.stats.queue_faults.total() == 0
        assert not stats.protocol_errors


@dataclass(frozen=True)
class BadPackedRing:
    build: Callable[[PackedRing, bool], object]
    fault: str
    queue: int = 1
    features: int = INDIRECT | VirtioFeature.RING_PACKED
    iommu: bool = False


PACKED_CASES = {
    "chain_longer_than_ring": BadPackedRing(
        badpacked.chain_longer_than_ring, "chain_loop_or_too_long"
    ),
    "wrong_wrap_bits": BadPackedRing(badpacked.wrong_wrap, "wrong_wrap_bits"),
    "wrong_wrap_bits_rx": BadPackedRing(badpacked.wrong_wrap, "wrong_wrap_bits", queue=0),
    "id_out_of_range": BadPackedRing(badpacked.id_out_of_range, "buffer_id_out_of_range"),
    "id_out_of_range_rx": BadPackedRing(
        badpacked.id_out_of_range, "buffer_id_out_of_range", queue=0
    ),
    "indirect_len_unaligned": BadPackedRing(
        badpacked.indirect_len_unaligned, "indirect_bad_length"
    ),
    "indirect_len0": BadPackedRing(badpacked.indirect_len0, "indirect_bad_length"),
    "indirect_nested": BadPackedRing(badpacked.indirect_nested, "indirect_nested"),
    "indirect_with_next": BadPackedRing(badpacked.indirect_with_next, "indirect_with_next"),
    "indirect_not_negotiated": BadPackedRing(
        badpacked.indirect_len_unaligned,
        "indirect_not_negotiated",
        features=DEFAULT_NET_FEATURES | VirtioFeature.RING_PACKED,
    ),
    "tx_writable": BadPackedRing(badpacked.wrong_direction, "wrong_descriptor_direction"),
    "rx_read_only": BadPackedRing(badpacked.wrong_direction, "wrong_descriptor_direction", queue=0),
    "unmapped": BadPackedRing(
        lambda r, rx: badpacked.single(r, GAP_GPA, 64, rx), "address_unmapped"
    ),
    "iova_past_2_64": BadPackedRing(
        lambda r, rx: badpacked.single(r, (1 << 64) - 16, 64, rx), "address_unmapped", iommu=True
    ),
}


@pytest.mark.parametrize("case", PACKED_CASES.values(), ids=PACKED_CASES.keys())
@pytest.mark.trio
async def test_bad_packed_ring_stops_only_its_queue(case: BadPackedRing) -> None:
    """As above, on packed rings that have already gone round once (wrap counter 0)."""
    async with (
        ports("reflect", "sink") as (_, (p0, p1)),
        Frontend.connect(p0.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=2, iommu=case.iommu, features=case.features, queue_size=8)
        stats = p0.stats
        q = case.queue
        # Queue pair 0 works, and its rings wrap, before the bad ring.
        post_rx(fe, 0, 4)
        for i in range(3):
            assert len(await fe.send_frames(1, [frame(4 * i + k, src=3) for k in range(4)])) == 4
            assert len(await recv_frames(fe, 0, count=4, refill=i < 2)) == 4
        ring = fe.vrings[q].ring
        # 12 chains each way on rings of 8, none outstanding: index 4, wrap counter 0.
        assert isinstance(ring, PackedRing) and ring.next_avail == 4 and not ring.outstanding
        fe.ram.arm_canary()
        packets_before = stats.queue(q).packets
        positions = case.build(ring, q == 0)
        assert positions
        descs_before = fe.ram.read(ring.desc_gpa, ring.desc_bytes)
        fe.kick(q)
        if q == 0:
            await fe.send_frames(1, [frame(99, src=3)])
        await until(lambda: stats.queue_faults.total() == 1)
        assert dict(stats.queue_faults) == {case.fault: 1}
        assert session(p0).vrings[q].failed is not None
        assert fe.err_pending(q)
        assert await fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
        # Nothing was written back into the ring: no used descriptor for a bad chain.
        assert fe.ram.read(ring.desc_gpa, ring.desc_bytes) == descs_before
        assert stats.queue(q).packets == packets_before
        fe.kick(q)
        await trio.sleep(0.01)
        assert stats.queue_faults.total() == 1
        post_rx(fe, 2, 4)
        assert len(await fe.send_frames(3, [frame(i) for i in range(4)])) == 4
        assert len(await fe.recv_frames(2, count=4)) == 4
        assert fe.ram.canary_violations() == []
        await check_port_works(p1, iommu=case.iommu)
        assert p1.stats.queue_faults.total() == 0
        assert not stats.protocol_errors
