"""Differential runs of the C burst path against the Python reference.

Each seed builds the same scenario twice (guest RAM, rings, chains, IOTLB
contents) and runs it once through ``net.TxQueue``/``net.RxQueue`` and once
through ``fastpath.FastTxQueue``/``FastRxQueue``, with a fake front-end that
answers IOTLB misses (or not) and invalidates mappings between bursts. Every
observable must match: frames forwarded, guest RAM byte for byte (used
entries, RX buffers, indices), fault kinds and messages, miss and denial
addresses, counters. ``tests/test_fastpath.py`` runs a fixed set of seeds;
``tests/fuzz_native.py`` runs many more, with hostile rings, under the
sanitizer build.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import IotlbPerm, MemoryRegion
from protocol.enums import VirtioFeature as VF
from tests.offload_frames import csum_header, gso_header, tcp4, tcp6
from tests.vusim import badpacked, badrings
from tests.vusim.dma import PhysicalDma
from tests.vusim.guestram import PAGE, GuestRam
from tests.vusim.packed import WRAP, PackedRing, PDesc
from tests.vusim.rings import F_INDIRECT, F_NEXT, F_WRITE, Buffer, Desc, SplitRing
from vhostd.dirtylog import DirtyLog, log_size
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
from vhostd.guestmem import GuestMemory
from vhostd.iotlb import IoTlb, IotlbDenied, IotlbMiss
from vhostd.memory import MemoryTable
from vhostd.native import ffi
from vhostd.net import QueueStats, RxQueue, TxQueue, max_tx_frame
from vhostd.offload import OFFLOAD_FEATURES, PLAIN, VnetHeader
from vhostd.virtqueue import QueueError
from vhostd.vqueue import Virtqueue, make_queue

SZ = 512 << 10
LAYOUT = [(0, SZ), (SZ, SZ), (3 * SZ, SZ)]  # two adjacent regions, then a gap
SEEDS = 150
RX_HEADERS = (
    PLAIN,
    VnetHeader(1, 1, 54, 1448, 34, 16),
    VnetHeader(2),
    VnetHeader(1, 0, 0, 0, 34, 16),
)
"""Offload headers RX frames are delivered with when the receiver took GUEST_CSUM/TSO."""


@dataclass
class FakeFrontend:
    """IOVA pages the guest mapped, what the back-end was told, and MISS answers."""

    rng: random.Random
    iotlb: IoTlb
    ram: GuestRam
    known: dict[int, tuple[int, int]] = field(default_factory=dict)  # page -> (uaddr, perm)
    lost: set[int] = field(default_factory=set)
    next_iova: int = 0x10_0000_0000

    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        rng = self.rng
        first = gpa & ~(PAGE - 1)
        span = ((gpa + max(size, 1) + PAGE - 1) & ~(PAGE - 1)) - first
        iova = self.next_iova
        self.next_iova += span + PAGE * rng.randrange(2)
        have = int(perm)
        if rng.random() < 0.04:
            have = 3 - have if have in (1, 2) else have  # the guest mapped it the wrong way
        whole = rng.random() < 0.3
        if whole:  # one entry for the whole buffer (may cross adjacent regions)
            if rng.random() < 0.85:
                self.iotlb.update(iova, span, self.ram.gpa_to_uaddr(first), IotlbPerm(have))
            for off in range(0, span, PAGE):
                self.known[iova + off] = (self.ram.gpa_to_uaddr(first + off), have)
        else:
            for off in range(0, span, PAGE):
                uaddr = self.ram.gpa_to_uaddr(first + off)
                self.known[iova + off] = (uaddr, have)
                roll = rng.random()
                if roll < 0.03:
                    self.lost.add(iova + off)
                elif roll > 0.12:
                    self.iotlb.update(iova + off, PAGE, uaddr, IotlbPerm(have))
        return iova + (gpa - first)

    def unmap_buffer(self, addr: int, size: int) -> None:
        pass

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        iova = self.next_iova
        span = (size + PAGE - 1) & ~(PAGE - 1)
        self.next_iova += span + PAGE
        self.iotlb.update(iova, span, self.ram.gpa_to_uaddr(gpa), IotlbPerm.RW)
        return iova

    def answer(self, iova: int) -> bool:
        page = iova & ~(PAGE - 1)
        if page in self.lost or page not in self.known:
            return False
        uaddr, have = self.known[page]
        self.iotlb.update(page, PAGE, uaddr, IotlbPerm(have))
        return True

    def churn(self) -> None:
        """Invalidate a known page (the guest unmapped and remapped it)."""
        if self.known:
            page = self.rng.choice(sorted(self.known))
            self.iotlb.invalidate(page, PAGE)


@dataclass
class Scenario:
    ram: GuestRam
    ring: SplitRing | PackedRing
    mem: GuestMemory
    table: MemoryTable
    frontend: FakeFrontend | None
    features: int
    indirect: bool
    limits: list[int]
    churn: list[bool]
    frames: list[bytes]
    discard: bool
    log: DirtyLog | None = None
    """Logging on: both paths must set the same bits."""
    log_fd: int = -1

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            os.close(self.log_fd)
        self.table.clear()
        self.ram.close()


def build(seed: int, rx: bool, hostile: bool = False, packed: bool = False) -> Scenario:
    """The scenario of ``seed``; ``hostile`` also scribbles over the rings afterwards.

    ``packed``: a packed ring of any size (not only powers of 2) that starts at
    a random position and wrap counter, so chains cross its end.
    """
    rng = random.Random(seed)
    ram = GuestRam(LAYOUT, one_fd=rng.random() < 0.5)
    table = MemoryTable(8)
    table.replace(
        [MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in ram.regions],
        [r.fd for r in ram.regions],
    )
    iotlb = IoTlb() if rng.random() < 0.5 else None
    frontend = FakeFrontend(rng, iotlb, ram) if iotlb is not None else None
    dma = frontend if frontend is not None else PhysicalDma(ram)
    ring: SplitRing | PackedRing
    if packed:
        size = rng.choice([5, 8, 16, 37, 64])
        start = rng.randrange(size) | (WRAP if rng.random() < 0.5 else 0)
        ring = PackedRing(ram, dma, size=size, event_idx=rng.random() < 0.5, start=start)  # type: ignore[arg-type]
    else:
        size = rng.choice([8, 16, 64])
        ring = SplitRing(ram, dma, size=size, event_idx=rng.random() < 0.5)  # type: ignore[arg-type]
    features = int(VF.VERSION_1) if rng.random() < 0.7 else 0
    if rx and rng.random() < 0.6:
        features |= VF.NET_MRG_RXBUF
    if features and rng.random() < 0.5:
        # Offloads: TX chains carry checksum/GSO headers (good, bad and hostile),
        # RX frames are delivered with them.
        features |= int(OFFLOAD_FEATURES) & ~(int(VF.NET_HOST_ECN) if rng.random() < 0.3 else 0)
    indirect = rng.random() < 0.8
    hdr_len = 12 if features else 10
    free = size
    bad_at = rng.randrange(size) if rng.random() < 0.35 else -1
    if packed and bad_at > 0 and rng.random() < 0.3:
        bad_at = 0  # an empty ring: room for a chain longer than the ring
    k = 0
    while free > 0 and k < size:
        if k == bad_at:
            if isinstance(ring, PackedRing):
                post_malicious_packed(rng, ring, rx)
            else:
                post_malicious(rng, ring, rx, frontend is not None)
            break
        nbuf = rng.choice([1, 1, 1, 2, 3, 4])
        use_ind = (indirect and rng.random() < 0.3) or (not indirect and rng.random() < 0.03)
        need = 1 if use_ind else nbuf
        if need > free:
            break
        if not rx and features & VF.NET_CSUM and rng.random() < 0.4:
            ring.post(_offload_chain(rng, ram, hdr_len, nbuf), indirect=use_ind)
            free -= need
            k += 1
            continue
        bufs = []
        for _ in range(nbuf):
            n = rng.choice([0, 1, 2, 7, hdr_len, 60, 64, 100, 300, 1500, 5000])
            gpa = _alloc(rng, ram, n)
            data = rng.randbytes(min(n, 64)) + bytes(max(n - 64, 0))
            if not rx and bufs == [] and rng.random() < 0.8 and n >= 2:
                data = bytes([rng.choice([0, 0, 0, 1]), rng.choice([0, 0, 0, 4])]) + data[2:]
            ram.write(gpa, data)
            bufs.append(Buffer(gpa, n, writable=rx))
        ring.post(bufs, indirect=use_ind)
        free -= need
        k += 1
    if hostile:
        if isinstance(ring, PackedRing):
            scribble_packed(rng, ring, frontend)
        else:
            scribble(rng, ring, frontend)
    frames = [
        rng.randbytes(rng.choice([14, 60, 64, 200, 1500, 3000]))
        for _ in range(rng.randrange(1, 3 * size))
    ]
    mem = GuestMemory(table, iotlb)
    s = Scenario(
        ram,
        ring,
        mem,
        table,
        frontend,
        features,
        indirect,
        limits=[rng.choice([1, 3, 64, 64, 256]) for _ in range(64)],
        churn=[rng.random() < 0.25 for _ in range(64)],
        frames=frames,
        discard=rng.random() < 0.3,
    )
    if rng.random() < 0.5:
        s.log_fd = os.memfd_create("differential-log", os.MFD_CLOEXEC)
        size = log_size(table)
        os.ftruncate(s.log_fd, size)
        s.log = DirtyLog(s.log_fd, size, 0, table)
    return s


# Addresses and lengths where checks live: region edges, the gap, the top of
# the address space, lengths around the header and past the chain limit.
EDGES = (0, 8, SZ - 8, SZ, 2 * SZ - 8, 2 * SZ, 3 * SZ - 8, 4 * SZ - 16, (1 << 64) - 16)
LENGTHS = (0, 1, 2, 11, 12, 13, 16, 17, 60, 1500, 4096, 65536, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF)


def scribble(rng: random.Random, ring: SplitRing, frontend: FakeFrontend | None) -> None:
    """What a hostile driver does after posting: rewrite descriptors, avail entries, index.

    Descriptors may then point anywhere: into the rings themselves, across
    region edges, into the gap, at IOVAs the guest mapped the wrong way.
    """
    size = ring.size
    if frontend is None:
        targets = [*EDGES, ring.desc_gpa, ring.avail_gpa, ring.used_gpa, ring.used_gpa + 4]
    else:
        targets = [*EDGES, ring.desc_addr, ring.avail_addr, ring.used_addr, ring.used_addr + 4]
        targets += rng.sample(sorted(frontend.known), min(8, len(frontend.known)))
    for _ in range(rng.randrange(1, 6)):
        roll = rng.random()
        if roll < 0.6:
            addr = rng.choice(targets) + rng.choice((0, 0, 1, 2, 16, 4090))
            ring.write_desc(
                rng.randrange(size),
                Desc(
                    addr & ((1 << 64) - 1),
                    rng.choice(LENGTHS),
                    rng.randrange(8),
                    rng.randrange(size + 2) & 0xFFFF,
                ),
            )
        elif roll < 0.85:
            ring.write_avail_entry(rng.randrange(size), rng.randrange(size + 2))
        else:
            ring.set_avail_idx((ring.avail_idx + rng.randrange(-2, size + 3)) & 0xFFFF)


def scribble_packed(rng: random.Random, ring: PackedRing, frontend: FakeFrontend | None) -> None:
    """What a hostile driver does to a packed ring after posting: rewrite descriptors,
    their flags (AVAIL/USED bits of either lap, NEXT, INDIRECT) and buffer ids."""
    size = ring.size
    if frontend is None:
        targets = [*EDGES, ring.desc_gpa, ring.avail_gpa, ring.used_gpa]
    else:
        targets = [*EDGES, ring.desc_addr, ring.avail_addr, ring.used_addr]
        targets += rng.sample(sorted(frontend.known), min(8, len(frontend.known)))
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(size)
        old = ring.read_desc(i)
        roll = rng.random()
        if roll < 0.5:
            addr = rng.choice(targets) + rng.choice((0, 0, 1, 2, 16, 4090))
            ring.write_desc(
                i,
                PDesc(
                    addr & ((1 << 64) - 1),
                    rng.choice(LENGTHS),
                    rng.randrange(size + 2),
                    (old.flags & 0x8080) | rng.randrange(8),
                ),
            )
        elif roll < 0.8:
            ring.write_flags(i, old.flags ^ rng.choice((0x80, 0x8000, 0x8080, 1, 4)))
        else:
            ring.write_desc(i, PDesc(old.addr, old.len, rng.randrange(0x10000), old.flags))


def _offload_chain(rng: random.Random, ram: GuestRam, hdr_len: int, nbuf: int) -> list[Buffer]:
    """A TX chain with a TCP frame and an offload header (mostly good), cut into ``nbuf``."""
    payload = rng.randbytes(rng.choice([10, 1000, 3000, 9000]))
    v6 = rng.random() < 0.4
    frame = (tcp6 if v6 else tcp4)(payload, csum="partial")
    mss = rng.choice([536, 1448, 1448, 20000])
    raw = (
        gso_header(frame, mss, v6, ecn=rng.random() < 0.2)
        if rng.random() < 0.7
        else csum_header(frame, v6)
    )
    if rng.random() < 0.25:  # a hostile field
        hdr = VnetHeader.unpack(raw)
        field_ = rng.randrange(6)
        raw = hdr._replace(
            **{hdr._fields[field_]: rng.randrange(0x10000) & (0xFF if field_ < 2 else 0xFFFF)}
        ).pack()
    data = raw.ljust(hdr_len, b"\0") + frame
    cuts = sorted(rng.sample(range(1, len(data)), nbuf - 1)) if nbuf > 1 else []
    bufs = []
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        gpa = _alloc(rng, ram, b - a)
        ram.write(gpa, data[a:b])
        bufs.append(Buffer(gpa, b - a, writable=False))
    return bufs


def _alloc(rng: random.Random, ram: GuestRam, n: int) -> int:
    """A buffer, sometimes placed across the boundary of the two adjacent regions."""
    if n > 16 and rng.random() < 0.1:
        try:
            return ram.alloc_at(SZ - rng.randrange(1, n), n)
        except MemoryError:
            pass
    return ram.alloc(n, rng.choice([1, 16, 64]))


def post_malicious(rng: random.Random, ring: SplitRing, rx: bool, iommu: bool) -> None:
    kinds: list[Callable[[], Any]] = [
        lambda: badrings.next_out_of_range(ring),
        lambda: badrings.loop(ring, rng.randrange(1, 4)),
        lambda: badrings.head_out_of_range(ring),
        lambda: badrings.avail_jump(ring),
        lambda: badrings.indirect_len0(ring),
        lambda: badrings.indirect_len_unaligned(ring),
        lambda: badrings.indirect_nested(ring),
        lambda: badrings.indirect_loop(ring),
        lambda: badrings.wrong_direction(ring, tx=not rx),
        lambda: badrings.single(ring, 0x7777_0000_0000, 64, F_WRITE if rx else 0),
        lambda: badrings.single(ring, (1 << 64) - 8, 64, F_WRITE if rx else 0),
        lambda: badrings.indirect(ring, [Desc(0x10, 64, F_WRITE if rx else 0)], table_len=16),
        lambda: badrings.indirect(
            ring, [Desc(0x40, 8, F_NEXT | (F_WRITE if rx else 0), 5)], table_len=16
        ),
        lambda: badrings.single(ring, 2 * SZ - 32, 64, F_WRITE if rx else 0),  # into the gap
        lambda: badrings.single(ring, 0x100, 2 << 20, F_WRITE if rx else 0),  # too long
        lambda: badrings.single(ring, 0x100, 64, F_INDIRECT),  # table without the feature?
    ]
    if len(ring._free) >= ring.size:
        kinds.append(lambda: badrings.too_long_chain(ring))
    try:
        rng.choice(kinds)()
    except (MemoryError, RuntimeError, ValueError):
        pass


def post_malicious_packed(rng: random.Random, ring: PackedRing, rx: bool) -> None:
    kinds: list[Callable[[], Any]] = [
        lambda: badpacked.wrong_wrap(ring, rx),
        lambda: badpacked.id_out_of_range(ring, rx),
        lambda: badpacked.indirect_len0(ring, rx),
        lambda: badpacked.indirect_len_unaligned(ring, rx),
        lambda: badpacked.indirect_nested(ring, rx),
        lambda: badpacked.indirect_with_next(ring, rx),
        lambda: badpacked.wrong_direction(ring, rx),
        lambda: badpacked.single(ring, 0x7777_0000_0000, 64, rx),
        lambda: badpacked.single(ring, (1 << 64) - 8, 64, rx),
        lambda: badpacked.single(ring, 2 * SZ - 32, 64, rx),  # into the gap
        lambda: badpacked.single(ring, 0x100, 2 << 20, rx),  # too long
        lambda: badpacked.indirect(ring, [PDesc(0x10, 64, 0, F_WRITE if rx else 0)], table_len=16),
    ]
    if ring.outstanding == 0 and rng.random() < 0.5:
        kinds = [lambda: badpacked.chain_longer_than_ring(ring, rx)]
    try:
        rng.choice(kinds)()
    except (MemoryError, RuntimeError, ValueError):
        pass


def queue_of(s: Scenario) -> Virtqueue:
    r = s.ring
    q = make_queue(
        isinstance(r, PackedRing),
        1,
        r.size,
        s.mem,
        desc_addr=r.desc_addr,
        avail_addr=r.avail_addr,
        used_addr=r.used_addr,
        base=r.start * 0x10001 if isinstance(r, PackedRing) else 0,
        event_idx=r.event_idx,
        indirect=s.indirect,
    )
    q.set_log(s.log)
    return q


def retry(s: Scenario, events: list[Any], step: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``step`` like the session does: answer misses, stop on errors."""
    while True:
        try:
            return True, step()
        except IotlbMiss as miss:
            events.append(("miss", miss.iova, int(miss.perm)))
            if s.frontend is None or not s.frontend.answer(miss.iova):
                return False, None
        except IotlbDenied as exc:
            events.append(("denied", exc.iova, int(exc.need), int(exc.have)))
            return False, None
        except QueueError as exc:
            events.append(("fault", exc.fault.value, str(exc)))
            return False, None


def run_tx(s: Scenario, cls: type[TxQueue]) -> dict[str, Any]:
    q = queue_of(s)
    tx = cls(q, s.features, max_tx_frame(s.features, 1500), QueueStats())
    out: list[bytes] = []
    events: list[Any] = []
    sink = None if s.discard else (lambda v, h: out.append((bytes(v), tuple(h))))
    for i, limit in enumerate(s.limits):
        ok, n = retry(s, events, lambda limit=limit: tx.burst(sink, limit))
        events.append(("burst", n))
        if not ok or not n:
            break
        if s.frontend is not None and s.churn[i]:
            s.frontend.churn()
    return _result(s, q, tx.stats, events, out)


def run_rx(s: Scenario, cls: type[RxQueue]) -> dict[str, Any]:
    q = queue_of(s)
    rx = cls(q, s.features, QueueStats())
    events: list[Any] = []
    for i, frame in enumerate(s.frames):
        ok, _ = retry(s, events, q.refresh)
        if ok:
            hdr = RX_HEADERS[i % len(RX_HEADERS)] if s.features & VF.NET_GUEST_CSUM else PLAIN
            ok, delivered = retry(s, events, lambda frame=frame, h=hdr: rx.deliver(frame, h))
            events.append(("deliver", delivered))
        if not ok or not delivered:
            break
        q.publish()
        if s.frontend is not None and s.churn[i % len(s.churn)]:
            s.frontend.churn()
    return _result(s, q, rx.stats, events, [])


def _swapped(frame: bytes) -> bytes:
    """What ``Port._reflect`` makes of a frame."""
    return frame[6:12] + frame[0:6] + frame[12:]


def run_rx_batch(s: Scenario, cls: type[RxQueue], swap: bool, seed: int) -> dict[str, Any]:
    """Frames in bursts of random sizes, like a reflect port's session.

    The reference delivers each frame alone; the C path hands each burst to
    ``deliver_batch`` and the frame it stopped at to ``deliver``, then batches
    again (what ``Port._reflect_burst`` does via ``Session.send``). With two
    RX queues, frames that hash to the other one are skipped by both. The
    observable outcome (events, RAM, indices, counters) must be the same.
    """
    q = queue_of(s)
    rx = cls(q, s.features, QueueStats())
    events: list[Any] = []
    rng = random.Random(seed)
    nsel = rng.choice([1, 1, 2])
    want = rng.randrange(nsel)
    frames = s.frames
    i = b = 0
    stopped = False

    def other(frame: bytes) -> bool:
        return nsel > 1 and (frame[5] ^ frame[11]) % nsel != want

    while i < len(frames) and not stopped:
        burst = frames[i : i + rng.choice([1, 2, 5, 32, 256])]
        ok, _ = retry(s, events, q.refresh)
        if not ok:
            break
        batch, keep = FrameBurst.of(burst)
        j = 0
        while j < len(burst):
            if other(burst[j]):
                events.append(("other",))
                j += 1
                continue
            if isinstance(rx, FastRxQueue):
                done = rx.deliver_batch(batch, swap, j, nsel, want)
                events.extend([("deliver", True)] * done)
                j += done
                if j == len(burst) or other(burst[j]):
                    continue
            frame = burst[j]
            data = _swapped(frame) if swap else frame
            ok, delivered = retry(s, events, functools.partial(rx.deliver, data))
            events.append(("deliver", delivered))
            if not ok or not delivered:
                stopped = True
                break
            j += 1
        del keep
        i += len(burst)
        q.publish()
        if s.frontend is not None and s.churn[b % len(s.churn)]:
            s.frontend.churn()
        b += 1
    return _result(s, q, rx.stats, events, [])


def _result(
    s: Scenario, q: Virtqueue, stats: QueueStats, events: list[Any], out: list[bytes]
) -> dict[str, Any]:
    return {
        "events": events,
        "frames": out,
        "ram": [bytes(r.mem[:]) for r in s.ram.regions],
        "indices": (q.last_avail, q.last_used),
        "stats": {name: getattr(stats, name) for name in QueueStats.__slots__},
        "iotlb_misses": None if s.mem.iotlb is None else s.mem.iotlb.stats.misses,
        "log": None if s.log is None else bytes(ffi.buffer(s.log.c.bits, s.log.size)),
    }


@functools.cache
def differential(
    seed: int, rx: bool, hostile: bool = False, packed: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    results = []
    for cls in (RxQueue, FastRxQueue) if rx else (TxQueue, FastTxQueue):
        s = build(seed, rx, hostile, packed)
        try:
            results.append(run_rx(s, cls) if rx else run_tx(s, cls))  # type: ignore[arg-type]
        finally:
            s.close()
    ref, fast = results
    if ref["iotlb_misses"] is not None:  # the IOTLB's own lookup counts differ by design
        ref["iotlb_misses"] = fast["iotlb_misses"] = None
    return ref, fast


def compare(ref: dict[str, Any], fast: dict[str, Any]) -> None:
    for key in ("events", "frames", "indices", "stats", "log"):
        assert fast[key] == ref[key], key
    for i, (a, b) in enumerate(zip(ref["ram"], fast["ram"], strict=True)):
        assert a == b, f"guest RAM region {i} differs"


def differential_batch(
    seed: int, swap: bool, hostile: bool = False, packed: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    results = []
    for cls in (RxQueue, FastRxQueue):
        s = build(seed, True, hostile, packed)
        try:
            results.append(run_rx_batch(s, cls, swap, seed))
        finally:
            s.close()
    ref, fast = results
    ref["iotlb_misses"] = fast["iotlb_misses"] = None  # the IOTLB's own lookups differ
    return ref, fast
