"""In-process packets per second of the C RX paths, packed ring vs split ring.

The two paths that write into RX rings, each with the ring task's Python
glue around the C calls (what ``rings.RingLoop`` runs per round):

- ``source``: ``SourceRing.fill`` (``FastRxQueue.deliver_batch`` over the
  template), then the round's publish and interrupt decision, until the ring
  is empty, then ``want_kicks`` as the task does before it sleeps;
- ``reflect``: the poll that finds TX chains (``rings._polled``), a TX burst
  handed whole to a reflect port's ``forward_burst`` (MACs swapped,
  ``deliver_batch`` into the RX ring), then both rings' publish and interrupt
  decisions.

Each lap re-offers every buffer of a ring of ``SIZE`` one-buffer chains
without the simulator in the loop (split: the avail index moves; packed: a
saved image of the descriptor ring for the next wrap is copied back), so
both layouts pay the same fixed cost per lap. CPU time by default, so other
load on the machine matters less; for numbers independent of load, count
instructions (``--case``/``--laps``: two runs under ``valgrind
--tool=callgrind``, the difference over the difference in frames).

    .venv/bin/python -m bench.packed_bench [--seconds 2] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from protocol import MemoryRegion
from protocol.enums import VirtioFeature as VF
from tests.vusim.dma import PhysicalDma
from tests.vusim.guestram import GuestRam
from tests.vusim.packed import F_AVAIL, F_USED, START, PackedRing
from tests.vusim.rings import Buffer, SplitRing
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
from vhostd.guestmem import GuestMemory
from vhostd.memory import MemoryTable
from vhostd.net import BURST
from vhostd.source import Source
from vhostd.vqueue import Virtqueue, make_queue

SIZE = 256
FEATURES = int(VF.VERSION_1 | VF.NET_MRG_RXBUF | VF.RING_EVENT_IDX)
CASES = ("source", "reflect")


def _any_chain(queue: Virtqueue) -> bool:
    """What the ring task's poll asks (``has_available``; ``available`` before it existed)."""
    has = getattr(queue, "has_available", None)
    return bool(has()) if has is not None else queue.available() != 0


class _Ring:
    """One driver ring of SIZE one-buffer chains that ``reoffer`` makes available again."""

    def __init__(self, ram: GuestRam, packed: bool, writable: bool, frame: bytes) -> None:
        dma = PhysicalDma(ram)
        self.ram = ram
        self.ring: PackedRing | SplitRing
        buffers = []
        for _ in range(SIZE):
            gpa = ram.alloc(2048 if writable else len(frame), 64)
            if not writable:
                ram.write(gpa, frame)
            buffers.append(Buffer(gpa, 2048 if writable else len(frame), writable=writable))
        if packed:
            ring = PackedRing(ram, dma, size=SIZE, event_idx=True)
            for buf in buffers:
                ring.post([buf])
            image = ram.read(ring.desc_gpa, 16 * SIZE)
            # The next lap (other wrap): the same descriptors, AVAIL/USED flipped.
            flipped = bytearray(image)
            for i in range(SIZE):
                at = 16 * i + 14
                flags = int.from_bytes(flipped[at : at + 2], "little") ^ (F_AVAIL | F_USED)
                flipped[at : at + 2] = flags.to_bytes(2, "little")
            self.images = [image, bytes(flipped)]  # even laps in wrap 1, odd ones in wrap 0
            self.ring = ring
        else:
            split = SplitRing(ram, dma, size=SIZE, event_idx=True)  # type: ignore[arg-type]
            for k, buf in enumerate(buffers):
                split.add_chain([buf])
                split.write_avail_entry(k, k)  # each lap's avail entries: reoffer moves the index
            self.ring = split
        self.lap = 0

    def reoffer(self) -> None:
        """Make all SIZE chains available again (the device took and returned them)."""
        ring = self.ring
        if isinstance(ring, PackedRing):
            self.ram.write(ring.desc_gpa, self.images[self.lap % 2])
        else:
            ring.set_avail_idx(ring.avail_idx + SIZE)
        self.lap += 1

    def queue(self, mem: GuestMemory, index: int, packed: bool) -> Virtqueue:
        r = self.ring
        return make_queue(
            packed,
            index,
            SIZE,
            mem,
            desc_addr=r.desc_addr,
            avail_addr=r.avail_addr,
            used_addr=r.used_addr,
            base=START | START << 16 if isinstance(r, PackedRing) else 0,
            event_idx=True,
            indirect=True,
        )


class _ReflectSession:
    """What ``fastpath`` recognises as a reflect-mode session: ``_sink`` and a port
    whose ``forward_burst`` swaps MACs into the RX ring, as ``Port._reflect_burst``."""

    def __init__(self, rx: FastRxQueue) -> None:
        self.rx = rx
        self.port = self
        self.forward_burst = self._reflect_burst

    def _sink(self, frame: memoryview, hdr: object) -> None:
        out = bytearray(frame)
        out[0:6], out[6:12] = out[6:12], out[0:6]
        self.rx.deliver(out)

    def _reflect_burst(self, session: object, burst: FrameBurst) -> None:
        n = len(burst)
        self.rx.queue.refresh()  # Session.send_burst does it before each batch
        i = self.rx.deliver_batch(burst, True, 0)
        while i < n:
            self._sink(burst.view(i), None)
            i += 1
            i += self.rx.deliver_batch(burst, True, i)


def _round_end(queue: Virtqueue) -> None:
    """``rings.publish`` without the eventfd: publish, then the interrupt decision."""
    queue.publish()
    if queue.published:
        queue.needs_interrupt()


Lap = Callable[[], int]


def _setup(case: str, packed: bool, frame_size: int) -> tuple[Lap, Callable[[], None]]:
    """(one lap: returns frames moved, close)."""
    ram = GuestRam([(0, 16 << 20)])
    table = MemoryTable(8)
    table.replace(
        [MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in ram.regions],
        [r.fd for r in ram.regions],
    )
    mem = GuestMemory(table, None)
    frame = bytes.fromhex("020000000002020000000001") + b"\x88\xb5" + bytes(frame_size - 14)
    rxr = _Ring(ram, packed, True, frame)
    rxq = rxr.queue(mem, 0, packed)
    rxq.sync_from_used()
    rx = FastRxQueue(rxq, FEATURES)

    def close() -> None:
        table.clear()
        ram.close()

    if case == "source":
        filler = Source(frame_size).ring(rx)

        def source_lap() -> int:
            rxr.reoffer()
            moved = 0
            while True:
                done = filler.fill()
                _round_end(rxq)
                moved += done
                if not done:
                    rxq.want_kicks()
                    return moved

        return source_lap, close
    txr = _Ring(ram, packed, False, frame)
    txq = txr.queue(mem, 1, packed)
    txq.sync_from_used()
    tx = FastTxQueue(txq, FEATURES, 1518)
    sink: Any = _ReflectSession(rx)._sink

    def reflect_lap() -> int:
        txr.reoffer()
        rxr.reoffer()
        moved = 0
        txq.refresh()
        while _any_chain(txq):
            moved += tx.burst(sink, BURST)
            _round_end(rxq)
            if txq.published:
                txq.needs_interrupt()
            txq.refresh()
        return moved

    return reflect_lap, close


def run(case: str, packed: bool, seconds: float, frame_size: int = 64, laps: int = 0) -> float:
    """Frames per CPU second (or, with ``laps``, exactly that many laps; returns frames)."""
    lap, close = _setup(case, packed, frame_size)
    try:
        lap()  # warm: caches filled, first lap's wrap
        frames = 0
        if laps:
            for _ in range(laps):
                frames += lap()
            return float(frames)
        clock = time.process_time
        start = clock()
        while clock() - start < seconds:
            got = lap()
            assert got == SIZE, f"{case}: a lap moved {got} frames, not {SIZE}"
            frames += got
        return frames / (clock() - start)
    finally:
        close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="0.2 s per case (does it work?)")
    parser.add_argument("--frame", type=int, default=64, help="frame bytes (64, 1518...)")
    parser.add_argument("--case", choices=[f"{c}-{r}" for c in CASES for r in ("split", "packed")])
    parser.add_argument("--laps", type=int, default=0, help="with --case: run exactly this many")
    args = parser.parse_args()
    if args.case:
        case, layout = args.case.split("-")
        n = run(case, layout == "packed", 0, args.frame, max(args.laps, 1))
        print(f"{args.case}: {n:.0f} frames")
        return
    seconds = 0.2 if args.quick else args.seconds
    print(f"{'case':8} {'frame':>5} {'split':>13} {'packed':>13} {'packed/split':>12}")
    for case in CASES:
        split = run(case, False, seconds, args.frame)
        packed = run(case, True, seconds, args.frame)
        print(
            f"{case:8} {args.frame:5} {split / 1e6:8.3f} Mpps {packed / 1e6:8.3f} Mpps"
            f" {packed / split:11.2f}x"
        )


if __name__ == "__main__":
    main()
