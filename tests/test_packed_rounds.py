"""The per-round work on a packed ring: the ring task's glue and the C batch write-back.

``has_available`` (what the poll and ``want_kicks`` ask) must answer as
``available() != 0`` does without counting every chain the driver posted,
and the C calls that return many chains at once (RX batch; TX completion,
which holds the first used descriptor's flags until the end of the call)
must leave every used descriptor, the first included, in the ring when they
return, also when the batch goes round the whole ring.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from protocol import MemoryRegion
from protocol.enums import VirtioFeature as VF
from tests.vusim.dma import PhysicalDma
from tests.vusim.guestram import GuestRam
from tests.vusim.packed import START, PackedRing, PDesc
from tests.vusim.rings import Buffer
from vhostd import rings
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
from vhostd.guestmem import GuestMemory
from vhostd.memory import MemoryTable
from vhostd.packed import PackedQueue
from vhostd.vqueue import make_queue

FEATURES = int(VF.VERSION_1 | VF.NET_MRG_RXBUF)


@contextmanager
def packed_ring(size: int) -> Iterator[tuple[GuestRam, PackedRing, PackedQueue]]:
    ram = GuestRam([(0, 4 << 20)])
    table = MemoryTable(8)
    table.replace(
        [MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in ram.regions],
        [r.fd for r in ram.regions],
    )
    try:
        ring = PackedRing(ram, PhysicalDma(ram), size=size)
        q = make_queue(
            True,
            0,
            size,
            GuestMemory(table, None),
            desc_addr=ring.desc_addr,
            avail_addr=ring.avail_addr,
            used_addr=ring.used_addr,
            base=START | START << 16,
            event_idx=False,
            indirect=True,
        )
        assert isinstance(q, PackedQueue)
        q.refresh()
        yield ram, ring, q
    finally:
        table.clear()
        ram.close()


def rx_buffers(ram: GuestRam, ring: PackedRing, n: int, parts: int = 1) -> None:
    for _ in range(n):
        ring.post([Buffer(ram.alloc(1024, 64), 1024, writable=True) for _ in range(parts)])


def test_has_available_answers_as_available_does() -> None:
    """Empty, one-descriptor and longer chains, taken ones, across the ring's end."""
    with packed_ring(7) as (ram, ring, q):
        fe_rx = FastRxQueue(q, FEATURES)
        assert q.has_available() is False and q.available() == 0
        for step in range(12):
            rx_buffers(ram, ring, 1, parts=1 + step % 2)
            assert q.has_available() == (q.available() != 0)
            assert q.want_kicks() == (q.available() != 0)
            assert fe_rx.deliver(b"\x02" * 60)
            assert q.has_available() == (q.available() != 0) is False
            ring.collect_used()
        # A descriptor written but not made available yet (head flags last).
        ring.place([PDesc(ram.alloc(64, 64), 64, 0, 2)], make_avail=False)
        assert q.has_available() is False and q.available() == 0


def test_the_round_glue_does_not_count_the_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll and want_kicks look at one descriptor, not every posted chain:
    they run once per round, and a Python loop per chain made a packed ring
    slower than a split one (fails on the previous packed.py: want_kicks scanned)."""
    with packed_ring(64) as (ram, ring, q):
        rx_buffers(ram, ring, 48)

        def no_scan(*_: object) -> tuple[int, int, int]:
            raise AssertionError("the ring was scanned")

        monkeypatch.setattr(PackedQueue, "_scan", no_scan)
        assert q.want_kicks()
        # rings._polled, the reflect TX ring's poll between bursts.
        assert trio.run(rings._polled, q, time.monotonic() + 5)
        assert q.has_available()


@pytest.mark.parametrize("size", [5, 8, 64])
def test_rx_batch_returns_every_used_descriptor_first_included(size: int) -> None:
    """A batch that fills the ring, round its end several times: after each call
    every buffer is used, in order, with its length."""
    with packed_ring(size) as (ram, ring, q):
        rx = FastRxQueue(q, FEATURES)
        frames = [bytes([i] * 6 + [0x10 + i] * 6) + b"\x88\xb5" + bytes(50) for i in range(3)]
        burst, keep = FrameBurst.of(frames * size)
        for _ in range(3):
            rx_buffers(ram, ring, size)
            q.refresh()
            done = rx.deliver_batch(burst, swap=True, end=size)
            assert done == size
            used = ring.collect_used()
            assert len(used) == size
            assert all(c.chain is not None for c in used)
            assert [c.len for c in used] == [12 + len(frames[0])] * size
            assert ring.pending_used() == 0
        del keep


def test_tx_completion_returns_every_chain_first_included() -> None:
    with packed_ring(16) as (ram, ring, q):
        tx = FastTxQueue(q, FEATURES, 1518)
        for _ in range(3):
            for i in range(16):
                gpa = ram.alloc(12 + 60, 64)
                ram.write(gpa, bytes(12) + bytes([i]) * 60)
                ring.post([Buffer(gpa, 72)])
            assert tx.burst(None) == 16
            used = ring.collect_used()
            assert len(used) == 16 and all(c.chain is not None and c.len == 0 for c in used)
