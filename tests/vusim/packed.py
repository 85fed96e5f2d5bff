"""The driver side of a packed virtqueue (VIRTIO 1.1), laid out in simulated guest RAM.

Same two layers as :mod:`tests.vusim.rings`: a *raw* one that writes any
descriptor with any flags and wrap bits at any position (malicious-ring
tests), and a *chain* one with the interface of ``SplitRing`` (``post``,
``collect_used``, ``needs_kick``, ``read_buffers``), keeping its own record of
what it posted by buffer id, so that completions are matched against what the
driver did and never against what a back-end wrote back.

Positions are encoded as vhost-user does: bits 0-14 the index, bit 15 the
wrap counter. The driver follows Linux's order: every descriptor of a chain
but the first, then the first one's flags (which make the chain available).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import IotlbPerm

from .dma import Dma
from .guestram import PAGE, GuestRam, align_up
from .rings import Buffer, Chain, Completion

DESC_SIZE = 16
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
WRAP = 1 << 15
START = WRAP
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2
_DESC = struct.Struct("<QIHH")


@dataclass(slots=True, frozen=True)
class PDesc:
    """A packed descriptor: ``flags`` raw (AVAIL/USED bits included)."""

    addr: int
    len: int
    id: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return _DESC.pack(self.addr, self.len, self.id, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> PDesc:
        return cls(*_DESC.unpack(data))


def advance(pos: int, n: int, size: int) -> int:
    idx = (pos & 0x7FFF) + n
    wrap = pos & WRAP
    while idx >= size:
        idx -= size
        wrap ^= WRAP
    return idx | wrap


def avail_bits(pos: int) -> int:
    """The AVAIL/USED bits that make a descriptor at ``pos`` available."""
    return F_AVAIL if pos & WRAP else F_USED


def linear(pos: int, size: int) -> int:
    return (pos & 0x7FFF) + (0 if pos & WRAP else size)


def need_event(event: int, new: int, old: int, size: int) -> bool:
    """Did the position cross ``event`` going old -> new (on the circle of 2 * size)?"""
    m = 2 * size
    e, n, o = linear(event, size), linear(new, size), linear(old, size)
    return (n - e - 1) % m < (n - o) % m


@dataclass(slots=True)
class PackedRing:
    """One packed virtqueue: a descriptor ring and two event areas, each page aligned."""

    ram: GuestRam
    dma: Dma
    size: int = 256
    event_idx: bool = False
    start: int = START
    """Where the ring starts (a ring that already went round, to test wrapping)."""
    desc_gpa: int = 0
    avail_gpa: int = 0
    """The driver event area (vhost-user's avail address)."""
    used_gpa: int = 0
    """The device event area (vhost-user's used address)."""
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    next_avail: int = 0
    last_used: int = 0
    outstanding: int = 0
    """Ring descriptors posted and not yet returned."""
    _free_ids: list[int] = field(default_factory=list)
    _chains: dict[int, Chain] = field(default_factory=dict)

    packed = True

    def __post_init__(self) -> None:
        if not 0 < self.size <= 32768:
            raise ValueError(f"queue size {self.size}")
        self.desc_gpa = self.ram.alloc(align_up(self.desc_bytes, PAGE), PAGE)
        self.avail_gpa = self.ram.alloc(PAGE, PAGE)
        self.used_gpa = self.ram.alloc(PAGE, PAGE)
        # Descriptors the driver never wrote read as used in wrap 0: not available
        # in the first lap (wrap 1). A ring that starts in wrap 0 gets them "used
        # in wrap 1" instead.
        idle = PDesc(0, 0, 0, 0 if self.start & WRAP else F_AVAIL | F_USED).pack()
        self.ram.write(self.desc_gpa, idle * self.size)
        self.ram.write(self.avail_gpa, bytes(4))
        self.ram.write(self.used_gpa, bytes(4))
        # Used descriptors are written back into the ring; the device event area too.
        self.ram.allow_device_write(self.desc_gpa, self.desc_bytes)
        self.ram.allow_device_write(self.used_gpa, 4)
        self.desc_addr = self.dma.ring_addr(self.desc_gpa, self.desc_bytes, IotlbPerm.RW)
        self.avail_addr = self.dma.ring_addr(self.avail_gpa, 4, IotlbPerm.RW)
        self.used_addr = self.dma.ring_addr(self.used_gpa, 4, IotlbPerm.RW)
        self.next_avail = self.last_used = self.start
        self._free_ids = list(range(self.size))
        if self.event_idx:
            self.set_used_event(self.last_used)

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @property
    def base(self) -> int:
        """The vring base a front-end sends: avail and used positions."""
        return self.next_avail | self.last_used << 16

    # -- raw layer ------------------------------------------------------
    def write_desc(self, i: int, desc: PDesc, *, table_gpa: int | None = None) -> None:
        """Write descriptor ``i`` of the ring (or of an indirect table), flags included."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.ram.write(base + DESC_SIZE * i, desc.pack())

    def write_flags(self, i: int, flags: int) -> None:
        self.ram.write_u16(self.desc_gpa + DESC_SIZE * i + 14, flags)

    def read_desc(self, i: int, *, table_gpa: int | None = None) -> PDesc:
        base = self.desc_gpa if table_gpa is None else table_gpa
        return PDesc.unpack(self.ram.read(base + DESC_SIZE * i, DESC_SIZE))

    def place(self, descs: Sequence[PDesc], *, make_avail: bool = True) -> list[int]:
        """Write ``descs`` at the next positions as one chain, head flags last.

        Each descriptor's AVAIL/USED bits are set for its own position
        (they flip where the chain crosses the end of the ring) and OR'ed
        with its ``flags``; returns the positions.
        """
        positions = []
        pos = self.next_avail
        for _ in descs:
            positions.append(pos)
            pos = advance(pos, 1, self.size)
        for k in range(len(descs) - 1, -1, -1):
            d, p = descs[k], positions[k]
            flags = d.flags | avail_bits(p)
            if k == 0:
                self.write_desc(p & 0x7FFF, PDesc(d.addr, d.len, d.id, d.flags & ~0xFFFF))
                if make_avail:
                    self.write_flags(p & 0x7FFF, flags)
            else:
                self.write_desc(p & 0x7FFF, PDesc(d.addr, d.len, d.id, flags))
        self.next_avail = pos
        self.outstanding += len(descs)
        return positions

    @property
    def avail_idx(self) -> int:
        """The driver's next position (what ``needs_kick`` compares against)."""
        return self.next_avail

    def suppress_interrupts(self, on: bool = True) -> None:
        self.ram.write_u16(self.avail_gpa + 2, EVENT_DISABLE if on else self._event_mode())

    def _event_mode(self) -> int:
        return EVENT_DESC if self.event_idx else EVENT_ENABLE

    def set_used_event(self, pos: int) -> None:
        """Ask for an interrupt when the device writes a used descriptor at ``pos``."""
        self.ram.write_u16(self.avail_gpa, pos)
        self.ram.write_u16(self.avail_gpa + 2, EVENT_DESC)

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote: when it wants kicks."""
        return self.ram.read_u16(self.used_gpa), self.ram.read_u16(self.used_gpa + 2)

    def needs_kick(self, old_avail: int) -> bool:
        """Whether the device asked to be notified for avail moving from old_avail."""
        off_wrap, flags = self.device_event()
        if flags == EVENT_DISABLE:
            return False
        if flags == EVENT_DESC and self.event_idx:
            return need_event(off_wrap, self.next_avail, old_avail, self.size)
        return True

    def used_at(self, pos: int) -> tuple[int, int] | None:
        """(id, len) of a used descriptor at ``pos`` in its wrap, else None."""
        d = self.read_desc(pos & 0x7FFF)
        want = F_AVAIL | F_USED if pos & WRAP else 0
        if d.flags & (F_AVAIL | F_USED) != want:
            return None
        return d.id, d.len

    def used_count(self) -> int:
        """Used descriptors the device wrote that the driver has not collected."""
        n, pos = 0, self.last_used
        seen = 0
        while seen < self.outstanding:
            got = self.used_at(pos)
            if got is None:
                break
            chain = self._chains.get(got[0])
            step = len(chain.descs) if chain is not None else 1
            pos = advance(pos, step, self.size)
            seen += step
            n += 1
        return n

    # -- chain layer ----------------------------------------------------
    def post(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Post ``buffers`` as one chain (or one indirect table); returns its buffer id."""
        if not buffers:
            raise ValueError("empty chain")
        if not self._free_ids:
            raise RuntimeError("no free buffer ids")
        dma: list[tuple[int, int]] = []
        descs: list[PDesc] = []
        for k, buf in enumerate(buffers):
            perm = IotlbPerm.WRITE if buf.writable else IotlbPerm.READ
            addr = self.dma.map_buffer(buf.gpa, buf.size, perm)
            dma.append((addr, buf.size))
            if buf.writable:
                self.ram.allow_device_write(buf.gpa, buf.size)
            flags = (F_WRITE if buf.writable else 0) | (F_NEXT if k + 1 < len(buffers) else 0)
            descs.append(PDesc(addr, buf.size, 0, flags))
        table_gpa = None
        if indirect:
            table_gpa = self.ram.alloc(DESC_SIZE * len(descs), DESC_SIZE)
            # Inside a table NEXT means nothing: entries are read in order.
            self.ram.write(table_gpa, b"".join(d.pack() for d in descs))
            taddr = self.dma.map_buffer(table_gpa, DESC_SIZE * len(descs), IotlbPerm.READ)
            dma.append((taddr, DESC_SIZE * len(descs)))
            descs = [PDesc(taddr, DESC_SIZE * len(descs), 0, F_INDIRECT)]
        if self.outstanding + len(descs) > self.size:
            raise RuntimeError(f"only {self.size - self.outstanding} free descriptors")
        buf_id = self._free_ids.pop(0)
        # Linux writes the id into every descriptor; the device reads the last one's.
        descs = [PDesc(d.addr, d.len, buf_id, d.flags) for d in descs]
        positions = self.place(descs)
        self._chains[buf_id] = Chain(buf_id, tuple(buffers), positions, dma, table_gpa)
        return buf_id

    def in_flight(self) -> int:
        return len(self._chains)

    def pending_used(self) -> int:
        return self.used_count()

    def collect_used(self) -> list[Completion]:
        """Consume new used descriptors; free and unmap the chains they complete."""
        out = []
        while self.outstanding:
            got = self.used_at(self.last_used)
            if got is None:
                break
            buf_id, length = got
            chain = self._chains.pop(buf_id, None)
            step = len(chain.descs) if chain is not None else 1
            self.last_used = advance(self.last_used, step, self.size)
            self.outstanding -= step
            if chain is not None:
                self._release(chain)
                self._free_ids.append(buf_id)
            out.append(Completion(buf_id, length, chain))
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out

    def _release(self, chain: Chain) -> None:
        for buf in chain.buffers:
            if buf.writable:
                self.ram.settle(buf.gpa, buf.size)
                self.ram.disallow_device_write(buf.gpa, buf.size)
        for addr, size in chain.dma:
            self.dma.unmap_buffer(addr, size)
        if chain.table_gpa is not None:
            self.ram.free(chain.table_gpa)

    def read_buffers(self, completion: Completion) -> bytes:
        """The bytes the device wrote into a completed chain, up to ``len``."""
        assert completion.chain is not None
        data = b"".join(
            self.ram.read(b.gpa, b.size) for b in completion.chain.buffers if b.writable
        )
        return data[: completion.len]
