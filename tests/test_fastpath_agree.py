"""The C path and the Python reference agree where a differential fuzz run found they did not.

Each test builds the same guest state twice, runs it once through the
reference (``net.TxQueue``/``net.RxQueue``) and once through C
(``FastTxQueue``/``FastRxQueue``), and compares what a guest could observe:
frames handed on, guest RAM byte for byte, ring indices, counters, errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from protocol import IotlbPerm, MemoryRegion
from protocol.enums import VirtioFeature as VF
from tests.vusim.dma import PhysicalDma
from tests.vusim.guestram import GuestRam
from tests.vusim.rings import Buffer, SplitRing
from vhostd.fastpath import FastRxQueue, FastTxQueue
from vhostd.guestmem import GuestMemory
from vhostd.iotlb import IoTlb, IotlbError, IotlbMiss
from vhostd.memory import MemoryTable
from vhostd.net import QueueStats, RxQueue, TxQueue
from vhostd.source import SourceRing, template
from vhostd.virtqueue import QueueError, QueueFault, SplitQueue

V1 = int(VF.VERSION_1)
HDR = 12
FRAME = bytes(range(60))


@dataclass
class Guest:
    """One copy of the state: RAM, its mapping in the back-end, a TX and an RX ring."""

    ram: GuestRam
    table: MemoryTable
    mem: GuestMemory
    tx: SplitRing
    rx: SplitRing

    @classmethod
    def make(cls, size: int = 8) -> Guest:
        ram = GuestRam([(0, 4 << 20)])
        table = MemoryTable(8)
        table.replace(
            [MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in ram.regions],
            [r.fd for r in ram.regions],
        )
        dma = PhysicalDma(ram)
        tx, rx = SplitRing(ram, dma, size=size), SplitRing(ram, dma, size=size)
        return cls(ram, table, GuestMemory(table), tx, rx)

    def queue(self, ring: SplitRing, index: int) -> SplitQueue:
        return SplitQueue(
            index,
            ring.size,
            self.mem,
            desc_addr=ring.desc_addr,
            avail_addr=ring.avail_addr,
            used_addr=ring.used_addr,
            base=0,
            event_idx=False,
            indirect=True,
        )

    def tx_frame(self, payload: bytes = FRAME, flags: int = 0, gpa: int | None = None) -> int:
        """Post one TX chain (header + payload); returns its buffer's gpa."""
        data = bytes([flags]) + bytes(HDR - 1) + payload
        if gpa is None:
            gpa = self.ram.alloc(len(data), 64)
        self.ram.write(gpa, data)
        self.tx.post([Buffer(gpa, len(data))])
        return gpa

    def close(self) -> None:
        self.table.clear()
        self.ram.close()


def observe(guest: Guest, queues: list[SplitQueue], stats: list[QueueStats], out: Any) -> Any:
    return (
        out,
        [bytes(r.mem[:]) for r in guest.ram.regions],
        [(q.last_avail, q.last_used) for q in queues],
        [tuple(getattr(s, n) for n in QueueStats.__slots__) for s in stats],
    )


def both(run: Callable[[Guest, bool], Any], size: int = 8) -> None:
    """Run ``run(guest, fast)`` on two identical guests; everything observed must match."""
    seen = []
    for fast in (False, True):
        guest = Guest.make(size)
        try:
            seen.append(run(guest, fast))
        finally:
            guest.close()
    ref, c = seen
    assert c[0] == ref[0], "frames or errors"
    assert c[2] == ref[2], "indices"
    assert c[3] == ref[3], "counters"
    assert c[1] == ref[1], "guest RAM"


def error(step: Callable[[], Any]) -> Any:
    try:
        return step()
    except (QueueError, IotlbError) as exc:
        return (type(exc).__name__, str(exc))


def test_a_tx_buffer_over_the_used_ring_reads_it_before_the_burst_is_returned() -> None:
    """C wrote the burst's used entries before the frames went on; the reference after."""

    def run(g: Guest, fast: bool) -> Any:
        g.tx_frame()
        g.tx.post([Buffer(g.tx.used_gpa, HDR + 60)])  # its frame is the used ring
        q = g.queue(g.tx, 1)
        tx = (FastTxQueue if fast else TxQueue)(q, V1, 1514, QueueStats())
        frames: list[bytes] = []
        n = error(lambda: tx.burst(lambda f, h: frames.append(bytes(f))))
        return observe(g, [q], [tx.stats], (n, frames))

    both(run)


def test_reflecting_into_a_later_tx_header_does_not_change_whether_it_is_sent() -> None:
    """Every chain of a burst is judged before any of its frames is delivered."""

    def run(g: Guest, fast: bool) -> Any:
        g.tx_frame()
        second = g.tx_frame(flags=1)  # NEEDS_CSUM without the offload: dropped
        g.rx.post([Buffer(second, HDR + 60, writable=True)])  # delivery rewrites that header
        tq, rq = g.queue(g.tx, 1), g.queue(g.rx, 0)
        tx = (FastTxQueue if fast else TxQueue)(tq, V1, 1514, QueueStats())
        rx = (FastRxQueue if fast else RxQueue)(rq, V1, QueueStats())
        rq.refresh()
        n = error(lambda: tx.burst(lambda f, h: rx.deliver(bytes(f[6:12]) + bytes(f[:6]) + f[12:])))
        rq.publish()
        return observe(g, [tq, rq], [tx.stats, rx.stats], n)

    both(run)


def test_a_source_port_stops_at_the_first_buffer_too_small_for_its_template() -> None:
    def run(g: Guest, fast: bool) -> Any:
        for _ in range(6):
            g.rx.post([Buffer(g.ram.alloc(40, 64), 40, writable=True)])  # header fits, frame not
        q = g.queue(g.rx, 0)
        rx = (FastRxQueue if fast else RxQueue)(q, V1, QueueStats())
        ring = SourceRing(template(64), rx)
        done = error(ring.fill)
        return observe(g, [q], [rx.stats], (done, ring.stuck))

    both(run)


def test_a_burst_takes_every_chain_it_is_allowed_past_256() -> None:
    def run(g: Guest, fast: bool) -> Any:
        for i in range(400):
            g.tx_frame(i.to_bytes(2, "big") * 30)
        q = g.queue(g.tx, 1)
        tx = (FastTxQueue if fast else TxQueue)(q, V1, 1514, QueueStats())
        frames: list[bytes] = []
        n = error(lambda: tx.burst(lambda f, h: frames.append(bytes(f)), 400))
        assert n == 400
        return observe(g, [q], [tx.stats], (n, frames))

    both(run, size=512)


@pytest.mark.parametrize("turn_on", [True, False], ids=["iotlb_on", "iotlb_off"])
def test_switching_access_platform_under_running_rings_drops_every_cached_translation(
    turn_on: bool,
) -> None:
    """The C translation cache must not outlive the address space it was filled for.

    On: descriptor addresses become IOVAs that nothing mapped yet, so both
    paths stop at a miss. Off: they are guest-physical again.
    """

    def run(g: Guest, fast: bool) -> Any:
        g.mem.iotlb = None if turn_on else _shifted_iotlb(g)
        q = g.queue(g.tx, 1)
        tx = (FastTxQueue if fast else TxQueue)(q, V1, 1514, QueueStats())
        frames: list[bytes] = []
        first = error(lambda: tx.burst(lambda f, h: frames.append(bytes(f))))
        g.tx_frame(b"second" * 10)
        g.mem.iotlb = IoTlb() if turn_on else None
        second = error(lambda: tx.burst(lambda f, h: frames.append(bytes(f))))
        return observe(g, [q], [tx.stats], (first, second, frames))

    def setup_and_run(g: Guest, fast: bool) -> Any:
        g.tx_frame()
        return run(g, fast)

    both(setup_and_run)


def _shifted_iotlb(g: Guest) -> IoTlb:
    """IOVA x is guest-physical x + 2 MiB, so the two address spaces read different bytes.

    The rings' addresses (front-end addresses) map to themselves.
    """
    tlb = IoTlb()
    region = g.ram.regions[0]
    half = region.size // 2
    tlb.update(region.gpa, half, region.uaddr + half, IotlbPerm.RW)
    tlb.update(region.uaddr, region.size, region.uaddr, IotlbPerm.RW)
    return tlb


@pytest.mark.parametrize("mergeable", [False, True], ids=["plain", "mrg"])
@pytest.mark.parametrize("size", [0, 1, HDR - 1])
def test_rx_buffers_too_small_for_the_header_stop_the_queue(size: int, mergeable: bool) -> None:
    def run(g: Guest, fast: bool) -> Any:
        g.rx.post([Buffer(g.ram.alloc(2048, 64), 2048, writable=True)])
        g.rx.post([Buffer(g.ram.alloc(max(size, 1), 64), size, writable=True)])
        features = V1 | (VF.NET_MRG_RXBUF if mergeable else 0)
        q = g.queue(g.rx, 0)
        rx = (FastRxQueue if fast else RxQueue)(q, features, QueueStats())
        q.refresh()
        out = [error(lambda: rx.deliver(FRAME)) for _ in range(2)]
        q.publish()
        return observe(g, [q], [rx.stats], out)

    both(run)
    g = Guest.make()
    try:
        g.rx.post([Buffer(g.ram.alloc(64, 64), size, writable=True)])
        q = g.queue(g.rx, 0)
        q.refresh()
        with pytest.raises(QueueError) as exc:
            FastRxQueue(q, V1, QueueStats()).deliver(FRAME)
        assert exc.value.fault is QueueFault.RX_SMALL
    finally:
        g.close()


@pytest.mark.parametrize(
    ("ring", "skew"), [("desc", 8), ("avail", 1), ("used", 2)], ids=["desc", "avail", "used"]
)
def test_misaligned_rings_are_refused(ring: str, skew: int) -> None:
    g = Guest.make()
    try:
        q = g.queue(g.tx, 1)
        setattr(q, f"{ring}_addr", getattr(q, f"{ring}_addr") + skew)
        with pytest.raises(QueueError) as exc:
            q.refresh()
        assert exc.value.fault is QueueFault.RING_MISALIGNED
    finally:
        g.close()


def test_rings_that_land_misaligned_in_this_process_are_refused() -> None:
    """A region whose mmap_offset skews local addresses against the front-end's."""
    ram = GuestRam([(0, 1 << 20)])
    table = MemoryTable(8)
    region = ram.regions[0]
    table.replace(
        [MemoryRegion(region.gpa, region.size - 4096, region.uaddr, region.mmap_offset + 8)],
        [region.fd],
    )
    try:
        q = SplitQueue(
            1,
            8,
            GuestMemory(table),
            desc_addr=region.uaddr,
            avail_addr=region.uaddr + 4096,
            used_addr=region.uaddr + 8192,
            base=0,
            event_idx=False,
            indirect=False,
        )
        with pytest.raises(QueueError) as exc:
            q.refresh()
        assert exc.value.fault is QueueFault.RING_MISALIGNED
    finally:
        table.clear()
        ram.close()


def test_a_miss_is_what_both_paths_report_for_a_fresh_iotlb() -> None:
    g = Guest.make()
    try:
        g.tx_frame()
        g.mem.iotlb = IoTlb()
        with pytest.raises(IotlbMiss):
            FastTxQueue(g.queue(g.tx, 1), V1, 1514, QueueStats()).burst(None)
    finally:
        g.close()
