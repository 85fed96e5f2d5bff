"""The guest's IOMMU, as far as a vhost-user back-end can see it.

The guest driver maps IOVAs to guest-physical pages; the front-end (QEMU)
answers the back-end's MISS from those mappings with an UPDATE that carries
a front-end user address.  This module holds the mappings and the *policy*
for answering misses, so tests can reproduce QEMU's behaviour (answer the
page, answer nothing for an unmapped IOVA) and misbehaviour (late answers,
wrong permissions).  It does no I/O: the front-end sends what it returns.
"""

from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field

from protocol import IotlbMsg, IotlbPerm, IotlbType

from .guestram import PAGE, GuestRam

IOVA_END = 1 << 64
LAZY_FLUSH_IOVA = 0xFEF0_0000
"""Linux intel-iommu lazy mode flushes everything as [0xfef00000, 2**64)."""


@dataclass(slots=True, frozen=True)
class Mapping:
    """[iova, iova+size) -> [gpa, gpa+size) with a permission."""

    iova: int
    size: int
    gpa: int
    perm: IotlbPerm

    @property
    def end(self) -> int:
        return self.iova + self.size


class MissMode(enum.Enum):
    ANSWER = "answer"
    """Answer at once, like QEMU."""
    DELAY = "delay"
    """Answer after ``MissPolicy.delay`` seconds (the back-end must keep serving meanwhile)."""
    NEVER = "never"
    """Drop every miss (a front-end that is stuck or hostile)."""


class Granularity(enum.Enum):
    PAGE = "page"
    """One 4 KiB page, aligned down: what QEMU with intel-iommu sends."""
    MAPPING = "mapping"
    """The whole mapping containing the IOVA, clipped to its RAM region."""


@dataclass(slots=True)
class MissPolicy:
    mode: MissMode = MissMode.ANSWER
    granularity: Granularity = Granularity.PAGE
    delay: float = 0.0
    perm_override: IotlbPerm | None = None
    """Send this permission instead of the mapping's one (a lying front-end)."""


class Direction(enum.Enum):
    FROM_BACKEND = "be->fe"
    TO_BACKEND = "fe->be"


@dataclass(slots=True, frozen=True)
class IotlbEvent:
    """One IOTLB message exchanged, for assertions on sequences."""

    when: float
    direction: Direction
    msg: IotlbMsg
    ack: int | None = None
    """For messages we sent with NEED_REPLY: the back-end's ack value."""


@dataclass(slots=True)
class VIommu:
    """IOVA -> gpa mappings plus the miss policy and a log of every IOTLB message."""

    ram: GuestRam
    policy: MissPolicy = field(default_factory=MissPolicy)
    log: list[IotlbEvent] = field(default_factory=list)
    _maps: list[Mapping] = field(default_factory=list)

    # -- mappings -------------------------------------------------------
    def map(self, iova: int, gpa: int, size: int, perm: IotlbPerm) -> Mapping:
        """Add a mapping; it must not overlap an existing one (like a real IOMMU API)."""
        if size <= 0 or iova + size > IOVA_END:
            raise ValueError(f"bad mapping {iova:#x}+{size:#x}")
        if self.overlapping(iova, size):
            raise ValueError(f"iova {iova:#x}+{size:#x} already mapped")
        mapping = Mapping(iova, size, gpa, perm)
        bisect.insort(self._maps, mapping, key=lambda m: m.iova)
        return mapping

    def map_pages(self, iova: int, gpa: int, size: int, perm: IotlbPerm) -> list[Mapping]:
        """Map page by page, as a driver using the DMA API at 4 KiB granularity would."""
        if iova % PAGE or gpa % PAGE:
            raise ValueError("page mappings need page-aligned iova and gpa")
        return [self.map(iova + off, gpa + off, PAGE, perm) for off in range(0, size, PAGE)]

    def unmap(self, iova: int, size: int) -> list[Mapping]:
        """Remove every mapping overlapping the range; partial overlaps are trimmed."""
        end = min(iova + size, IOVA_END)
        removed = self.overlapping(iova, end - iova)
        for m in removed:
            self._maps.remove(m)
            if m.iova < iova:
                self.map(m.iova, m.gpa, iova - m.iova, m.perm)
            if m.end > end:
                self.map(end, m.gpa + (end - m.iova), m.end - end, m.perm)
        return removed

    def overlapping(self, iova: int, size: int) -> list[Mapping]:
        end = iova + size
        return [m for m in self._maps if m.iova < end and iova < m.end]

    def lookup(self, iova: int) -> Mapping | None:
        i = bisect.bisect_right(self._maps, iova, key=lambda m: m.iova) - 1
        if i >= 0 and self._maps[i].iova <= iova < self._maps[i].end:
            return self._maps[i]
        return None

    def translate(self, iova: int) -> int:
        """IOVA -> gpa, raising KeyError when unmapped (the guest's view)."""
        m = self.lookup(iova)
        if m is None:
            raise KeyError(f"iova {iova:#x} not mapped")
        return m.gpa + (iova - m.iova)

    @property
    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    # -- messages -------------------------------------------------------
    def answer_miss(self, iova: int, perm: IotlbPerm) -> IotlbMsg | None:
        """The UPDATE a front-end would send for a MISS, or None (QEMU sends nothing).

        ``perm`` is what the back-end asked for; like QEMU we answer with the
        mapping's own permission, and the back-end must check it.
        """
        del perm
        m = self.lookup(iova)
        if m is None:
            return None
        if self.policy.granularity is Granularity.PAGE:
            start = max(iova & ~(PAGE - 1), m.iova)
            end = min((iova & ~(PAGE - 1)) + PAGE, m.end)
        else:
            start, end = m.iova, m.end
        # The uaddr range must be contiguous: clip to the RAM region.
        gpa = m.gpa + (iova - m.iova)
        region = self.ram.region_of(gpa)
        start = max(start, iova - (gpa - region.gpa))
        end = min(end, iova + (region.gpa_end - gpa))
        uaddr = self.ram.gpa_to_uaddr(m.gpa + (start - m.iova))
        out_perm = self.policy.perm_override if self.policy.perm_override is not None else m.perm
        return IotlbMsg(start, end - start, uaddr, out_perm, IotlbType.UPDATE)

    def update_for(self, iova: int, size: int) -> list[IotlbMsg]:
        """UPDATEs covering [iova, iova+size) mapping by mapping (for prefilling)."""
        out = []
        for m in self.overlapping(iova, size):
            cur = max(iova, m.iova)
            stop = min(iova + size, m.end)
            while cur < stop:
                gpa = m.gpa + (cur - m.iova)
                region = self.ram.region_of(gpa)
                n = min(stop - cur, region.gpa_end - gpa)
                out.append(IotlbMsg(cur, n, self.ram.gpa_to_uaddr(gpa), m.perm, IotlbType.UPDATE))
                cur += n
        return out

    @staticmethod
    def invalidate_msg(iova: int, size: int) -> IotlbMsg:
        return IotlbMsg(iova, size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE)

    @staticmethod
    def lazy_flush_msg() -> IotlbMsg:
        """Linux lazy-mode flush-all: ends at exactly 2**64."""
        return VIommu.invalidate_msg(LAZY_FLUSH_IOVA, IOVA_END - LAZY_FLUSH_IOVA)

    def record(self, direction: Direction, msg: IotlbMsg, ack: int | None = None) -> None:
        self.log.append(IotlbEvent(time.monotonic(), direction, msg, ack))

    def misses(self) -> list[IotlbMsg]:
        return [
            e.msg
            for e in self.log
            if e.direction is Direction.FROM_BACKEND and e.msg.type is IotlbType.MISS
        ]

    def sent(self, kind: IotlbType | None = None) -> list[IotlbEvent]:
        return [
            e
            for e in self.log
            if e.direction is Direction.TO_BACKEND and (kind is None or e.msg.type is kind)
        ]


@dataclass(slots=True)
class IovaAllocator:
    """Hands out page-aligned IOVA windows, deliberately unlike gpas.

    IOVAs start at ``base`` (default 0xd000_0000, below Linux's 0xfef00000
    MSI window) so that a back-end using an IOVA as a gpa or uaddr misses.
    """

    base: int = 0xD000_0000
    _next: int = 0

    def take(self, size: int) -> int:
        if not self._next:
            self._next = self.base
        iova = self._next
        self._next += (size + PAGE - 1) & ~(PAGE - 1)
        self._next += PAGE  # guard page: never mapped
        return iova
