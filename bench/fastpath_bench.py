"""In-process packets per second: Python reference queues vs the C fast path.

Builds guest RAM and rings with the simulator's helpers, posts a full ring of
64-byte frames once and re-offers it round after round by moving the avail
index (no simulator cost in the loop). "sink" counts TX frames; "reflect"
swaps MACs and delivers each TX frame into an RX ring, as reflect mode does.

    .venv/bin/python -m bench.fastpath_bench [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from protocol import IotlbPerm, MemoryRegion
from protocol.enums import VirtioFeature as VF
from tests.vusim.dma import PhysicalDma
from tests.vusim.guestram import GuestRam
from tests.vusim.rings import Buffer, SplitRing
from vhostd.dirtylog import DirtyLog, log_size
from vhostd.fastpath import FastRxQueue, FastTxQueue
from vhostd.guestmem import GuestMemory
from vhostd.iotlb import IoTlb
from vhostd.memory import MemoryTable
from vhostd.net import RxQueue, TxQueue
from vhostd.virtqueue import SplitQueue

SIZE = 256
FRAME = 64
FEATURES = int(VF.VERSION_1 | VF.NET_MRG_RXBUF)


class IdentityIommu:
    """IOVA == gpa, one 4 KiB IOTLB entry per page (what QEMU's intel-iommu answers)."""

    def __init__(self, ram: GuestRam, iotlb: IoTlb) -> None:
        self.ram, self.iotlb = ram, iotlb

    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        for page in range(gpa & ~0xFFF, gpa + size, 0x1000):
            self.iotlb.update(page, 0x1000, self.ram.gpa_to_uaddr(page), IotlbPerm.RW)
        return gpa

    def unmap_buffer(self, addr: int, size: int) -> None:
        pass

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        return self.map_buffer(gpa, size, perm)


def setup(iommu: bool) -> tuple[GuestRam, MemoryTable, GuestMemory, SplitRing, SplitRing]:
    ram = GuestRam([(0, 8 << 20)])
    table = MemoryTable(8)
    table.replace(
        [MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in ram.regions],
        [r.fd for r in ram.regions],
    )
    iotlb = IoTlb() if iommu else None
    dma = IdentityIommu(ram, iotlb) if iotlb is not None else PhysicalDma(ram)
    tx = SplitRing(ram, dma, size=SIZE, event_idx=True)  # type: ignore[arg-type]
    rx = SplitRing(ram, dma, size=SIZE, event_idx=True)  # type: ignore[arg-type]
    frame = bytes(12) + bytes.fromhex("0200000000010200000000020800") + bytes(FRAME - 14)
    for _ in range(SIZE):
        gpa = ram.alloc(len(frame), 64)
        ram.write(gpa, frame)
        tx.add_chain([Buffer(gpa, len(frame))])
        rx.add_chain([Buffer(ram.alloc(2048, 64), 2048, writable=True)])
    for ring in (tx, rx):
        ring.push_heads(list(range(SIZE)))  # single-buffer chains: heads 0..SIZE-1
    return ram, table, GuestMemory(table, iotlb), tx, rx


def queue(mem: GuestMemory, ring: SplitRing, index: int) -> SplitQueue:
    return SplitQueue(
        index,
        ring.size,
        mem,
        desc_addr=ring.desc_addr,
        avail_addr=ring.avail_addr,
        used_addr=ring.used_addr,
        base=0,
        event_idx=True,
        indirect=True,
    )


def run(
    mode: str,
    fast: bool,
    iommu: bool,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    log: bool = False,
) -> float:
    """Frames per second of ``clock`` (wall time, or CPU time to shed other load).

    ``log``: every guest write is logged into a dirty log, as during a migration.
    """
    ram, table, mem, txr, rxr = setup(iommu)
    dirty = None
    try:
        txq, rxq = queue(mem, txr, 1), queue(mem, rxr, 0)
        if log:
            dirty = dirty_log(table)
            txq.set_log(dirty)
            rxq.set_log(dirty)
        tx = (FastTxQueue if fast else TxQueue)(txq, FEATURES, 1518)
        rx = (FastRxQueue if fast else RxQueue)(rxq, FEATURES)

        def reflect(frame: memoryview, hdr: object) -> None:
            out = bytearray(frame)
            out[0:6], out[6:12] = out[6:12], out[0:6]
            rx.deliver(out)

        sink = reflect if mode == "reflect" else None
        frames = 0
        start = clock()
        while clock() - start < seconds:
            rxq.refresh()  # the session does this before delivering
            left = SIZE
            while left:
                left -= tx.burst(sink)
            if mode == "reflect":
                rxq.publish()
                rxr.set_avail_idx(rxr.avail_idx + SIZE)
            txr.set_avail_idx(txr.avail_idx + SIZE)
            frames += SIZE
        elapsed = clock() - start
        assert tx.stats.packets == frames
        if mode == "reflect":
            assert rx.stats.packets == frames
        assert not log or (dirty is not None and dirty.logged > 0)
        return frames / elapsed
    finally:
        if dirty is not None:
            dirty.close()
        table.clear()
        ram.close()


def dirty_log(table: MemoryTable) -> DirtyLog:
    fd = os.memfd_create("bench-log", os.MFD_CLOEXEC)
    try:
        size = log_size(table)
        os.ftruncate(fd, size)
        return DirtyLog(fd, size, 0, table)
    finally:
        os.close(fd)  # the mapping stays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"{'mode':8} {'iotlb':6} {'python':>12} {'C':>12} {'speed-up':>9}")
    for mode in ("sink", "reflect"):
        for iommu in (False, True):
            py = run(mode, False, iommu, args.seconds)
            c = run(mode, True, iommu, args.seconds)
            print(f"{mode:8} {iommu!s:6} {py / 1e6:9.3f} Mpps {c / 1e6:9.3f} Mpps {c / py:8.1f}x")


if __name__ == "__main__":
    main()
