"""The driver side of a split virtqueue, laid out in simulated guest RAM.

Two layers: a *raw* one (write any descriptor, any avail entry, any index)
for malicious-ring tests, and a *chain* one that keeps its own record of
what it posted, so that completions are matched against what the driver
really did and never against what a (possibly buggy) back-end wrote back.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import IotlbPerm

from .dma import Dma
from .guestram import PAGE, GuestRam, align_up

DESC_SIZE = 16
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


@dataclass(slots=True, frozen=True)
class Desc:
    addr: int
    len: int
    flags: int = 0
    next: int = 0

    def pack(self) -> bytes:
        return _DESC.pack(self.addr, self.len, self.flags, self.next)

    @classmethod
    def unpack(cls, data: bytes) -> Desc:
        return cls(*_DESC.unpack(data))


@dataclass(slots=True, frozen=True)
class Buffer:
    """A piece of guest RAM for one descriptor; ``writable`` = device writes it."""

    gpa: int
    size: int
    writable: bool = False


@dataclass(slots=True)
class Chain:
    """What the driver posted under one head (its own record, not the ring's)."""

    head: int
    buffers: tuple[Buffer, ...]
    descs: list[int]
    dma: list[tuple[int, int]]
    """(device address, size) of every DMA mapping made for the chain."""
    table_gpa: int | None = None


@dataclass(slots=True, frozen=True)
class Completion:
    head: int
    len: int
    chain: Chain | None
    """None when the back-end returned an id we never posted (or twice)."""


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index cross ``event`` going old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass(slots=True)
class SplitRing:
    """One split virtqueue: desc table, avail ring and used ring, each page aligned."""

    ram: GuestRam
    dma: Dma
    size: int = 256
    event_idx: bool = False
    desc_gpa: int = 0
    avail_gpa: int = 0
    used_gpa: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    last_used: int = 0
    _avail_idx: int = 0
    _free: list[int] = field(default_factory=list)
    _chains: dict[int, Chain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or not 0 < self.size <= 32768:
            raise ValueError(f"queue size {self.size}")
        # Whole pages: the DMA mapping of a ring covers its pages, so no
        # buffer may share them (or a canary could not tell who wrote what).
        self.desc_gpa = self.ram.alloc(align_up(self.desc_bytes, PAGE), PAGE)
        self.avail_gpa = self.ram.alloc(align_up(self.avail_bytes, PAGE), PAGE)
        self.used_gpa = self.ram.alloc(align_up(self.used_bytes, PAGE), PAGE)
        self.ram.write(self.desc_gpa, bytes(self.desc_bytes))
        self.ram.write(self.avail_gpa, bytes(self.avail_bytes))
        self.ram.write(self.used_gpa, bytes(self.used_bytes))
        self.ram.allow_device_write(self.used_gpa, self.used_bytes)
        self.desc_addr = self.dma.ring_addr(self.desc_gpa, self.desc_bytes, IotlbPerm.RW)
        self.avail_addr = self.dma.ring_addr(self.avail_gpa, self.avail_bytes, IotlbPerm.RW)
        self.used_addr = self.dma.ring_addr(self.used_gpa, self.used_bytes, IotlbPerm.RW)
        self._free = list(range(self.size))

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size

    @property
    def used_bytes(self) -> int:
        return 6 + 8 * self.size

    # -- raw layer ------------------------------------------------------
    def write_desc(self, i: int, desc: Desc, *, table_gpa: int | None = None) -> None:
        """Write descriptor ``i`` of the ring (or of an indirect table)."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.ram.write(base + DESC_SIZE * i, desc.pack())

    def read_desc(self, i: int, *, table_gpa: int | None = None) -> Desc:
        base = self.desc_gpa if table_gpa is None else table_gpa
        return Desc.unpack(self.ram.read(base + DESC_SIZE * i, DESC_SIZE))

    def take_descs(self, n: int) -> list[int]:
        """Reserve ``n`` ring slots for hand-written descriptors."""
        if n > len(self._free):
            raise RuntimeError(f"only {len(self._free)} free descriptors")
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Publish an arbitrary avail index (e.g. jump by more than the size)."""
        self._avail_idx = value & 0xFFFF
        self.ram.write_u16(self.avail_gpa + 2, self._avail_idx)

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.ram.write_u16(self.avail_gpa + 4 + 2 * (slot % self.size), head)

    def push_heads(self, heads: Sequence[int]) -> None:
        """Put heads in the avail ring, then move the index (in that order)."""
        for k, head in enumerate(heads):
            self.write_avail_entry(self._avail_idx + k, head)
        self.set_avail_idx(self._avail_idx + len(heads))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write_u16(self.avail_gpa, flags)

    def suppress_interrupts(self, on: bool = True) -> None:
        self.set_avail_flags(AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self.ram.write_u16(self.avail_gpa + 4 + 2 * self.size, value)

    def used_flags(self) -> int:
        return self.ram.read_u16(self.used_gpa)

    def used_idx(self) -> int:
        return self.ram.read_u16(self.used_gpa + 2)

    def read_used(self, slot: int) -> tuple[int, int]:
        off = self.used_gpa + 4 + 8 * (slot % self.size)
        return _USED_ELEM.unpack(self.ram.read(off, 8))

    def avail_event(self) -> int:
        return self.ram.read_u16(self.used_gpa + 4 + 8 * self.size)

    def needs_kick(self, old_avail: int) -> bool:
        """Whether the device asked to be notified for avail moving from old_avail."""
        if self.event_idx:
            return need_event(self.avail_event(), self._avail_idx, old_avail)
        return not self.used_flags() & USED_F_NO_NOTIFY

    # -- chain layer ----------------------------------------------------
    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Write descriptors for ``buffers`` (readable ones first, as virtio wants)."""
        if not buffers:
            raise ValueError("empty chain")
        dma: list[tuple[int, int]] = []
        descs: list[Desc] = []
        for k, buf in enumerate(buffers):
            perm = IotlbPerm.WRITE if buf.writable else IotlbPerm.READ
            addr = self.dma.map_buffer(buf.gpa, buf.size, perm)
            dma.append((addr, buf.size))
            if buf.writable:
                self.ram.allow_device_write(buf.gpa, buf.size)
            flags = (F_WRITE if buf.writable else 0) | (F_NEXT if k + 1 < len(buffers) else 0)
            descs.append(Desc(addr, buf.size, flags, k + 1 if k + 1 < len(buffers) else 0))
        if indirect:
            table = self.ram.alloc(DESC_SIZE * len(descs), DESC_SIZE)
            self.ram.write(table, b"".join(d.pack() for d in descs))
            taddr = self.dma.map_buffer(table, DESC_SIZE * len(descs), IotlbPerm.READ)
            dma.append((taddr, DESC_SIZE * len(descs)))
            [head] = self.take_descs(1)
            self.write_desc(head, Desc(taddr, DESC_SIZE * len(descs), F_INDIRECT, 0))
            self._chains[head] = Chain(head, tuple(buffers), [head], dma, table)
            return head
        slots = self.take_descs(len(descs))
        for k, (slot, d) in enumerate(zip(slots, descs, strict=True)):
            nxt = slots[k + 1] if d.flags & F_NEXT else 0
            self.write_desc(slot, Desc(d.addr, d.len, d.flags, nxt))
        self._chains[slots[0]] = Chain(slots[0], tuple(buffers), slots, dma)
        return slots[0]

    def post(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        head = self.add_chain(buffers, indirect=indirect)
        self.push_heads([head])
        return head

    def in_flight(self) -> int:
        return len(self._chains)

    def pending_used(self) -> int:
        return (self.used_idx() - self.last_used) & 0xFFFF

    def collect_used(self) -> list[Completion]:
        """Consume new used entries; free and unmap the chains they complete."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            head, length = self.read_used(self.last_used)
            self.last_used = (self.last_used + 1) & 0xFFFF
            chain = self._chains.pop(head, None)
            if chain is not None:
                self._release(chain)
            out.append(Completion(head, length, chain))
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
        self._free.extend(chain.descs)

    def read_buffers(self, completion: Completion) -> bytes:
        """The bytes the device wrote into a completed chain, up to ``len``."""
        assert completion.chain is not None
        data = b"".join(
            self.ram.read(b.gpa, b.size) for b in completion.chain.buffers if b.writable
        )
        return data[: completion.len]
