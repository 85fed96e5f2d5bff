"""The one door through which vhostd touches guest memory.

Every address a guest driver writes into a ring goes through
:class:`GuestMemory`: with the device IOTLB on (ACCESS_PLATFORM negotiated)
it is an IOVA, translated by the IOTLB into a front-end virtual address with
the access checked against the permission the guest granted; then the memory
table turns it into a local view, bounds-checked against the region. Without
the IOTLB, descriptor addresses are guest physical and ring addresses are
front-end virtual, as vhost-user defines them.

Failures are exceptions that say what to do next: :class:`IotlbMiss` means
"ask the front-end and retry", everything else derived from
:class:`AccessError` means "this queue is broken".
"""

from __future__ import annotations

from protocol.enums import IotlbPerm

from .iotlb import IoTlb, IotlbDenied, IotlbDiscontiguous, IotlbMiss
from .memory import AddressFault, MappedRegion, MemoryTable, local_address
from .native import ffi

__all__ = ["AccessError", "GuestMemory", "IotlbDenied", "IotlbMiss", "OutsideMemory"]

READ = IotlbPerm.READ
WRITE = IotlbPerm.WRITE


class AccessError(Exception):
    """A guest address that must not, or cannot, be accessed."""


class OutsideMemory(AccessError):
    """The address translated fine but lies outside every shared region."""


class GuestMemory:
    """Translate ring and buffer addresses to local memory, checked.

    ``iotlb`` is None when the front-end did not negotiate ACCESS_PLATFORM.
    Views returned here must not be kept across an ``await``: the IOTLB or
    the memory table may change while the task sleeps, and both are
    checked again on the next call.
    """

    __slots__ = ("_iotlb", "_spaces", "table")

    def __init__(self, table: MemoryTable, iotlb: IoTlb | None = None) -> None:
        self.table = table
        self._iotlb = iotlb
        self._spaces = 0

    @property
    def iotlb(self) -> IoTlb | None:
        return self._iotlb

    @iotlb.setter
    def iotlb(self, iotlb: IoTlb | None) -> None:
        # A new address space (ACCESS_PLATFORM switched, or another IOTLB):
        # nothing translated in the old one may be used again.
        if iotlb is not self._iotlb:
            self._iotlb = iotlb
            self._spaces += 1

    @property
    def generation(self) -> tuple[int, int, int]:
        """Changes whenever a view obtained earlier may have become stale."""
        iotlb = self._iotlb
        return (
            self.table.generation,
            iotlb.generation if iotlb is not None else 0,
            self._spaces,
        )

    def buffer(self, addr: int, size: int, perm: IotlbPerm) -> memoryview:
        """A descriptor's buffer as one contiguous view.

        Raises :class:`IotlbMiss` (retry after the front-end answers),
        :class:`IotlbDenied` or :class:`OutsideMemory`. A buffer whose
        translation is split across regions raises :class:`OutsideMemory`
        too; callers that can gather use :meth:`buffer_segments`.
        """
        try:
            iotlb = self._iotlb
            if iotlb is None:
                return self.table.gpa_view(addr, size)
            return self.table.uaddr_view(iotlb.translate(addr, size, perm), size)
        except (AddressFault, IotlbDiscontiguous, ValueError) as exc:
            raise OutsideMemory(str(exc)) from None

    def buffer_segments(self, addr: int, size: int, perm: IotlbPerm) -> list[memoryview]:
        """A descriptor's buffer as views, split where regions or mappings split it."""
        try:
            return [self.buffer(addr, size, perm)]
        except OutsideMemory:
            pass
        out: list[memoryview] = []
        iotlb, table = self._iotlb, self.table
        try:
            if iotlb is None:
                while size:
                    n = min(size, table.gpa_span(addr))
                    if n == 0:
                        raise AddressFault(addr, size, "guest physical")
                    out.append(table.gpa_view(addr, n))
                    addr += n
                    size -= n
                return out
            for uaddr, length in iotlb.translate_segments(addr, size, perm):
                while length:
                    n = min(length, table.uaddr_span(uaddr))
                    if n == 0:
                        raise AddressFault(uaddr, length, "front-end virtual")
                    out.append(table.uaddr_view(uaddr, n))
                    uaddr += n
                    length -= n
            return out
        except (AddressFault, ValueError) as exc:
            raise OutsideMemory(str(exc)) from None

    def extent(self, addr: int, perm: IotlbPerm, ring: bool = False) -> tuple[int, int, int, int]:
        """The largest ``(start, end, local, gpa)`` around ``addr`` that maps linearly.

        Every address in ``[start, end)`` is accessible with ``perm`` and lives
        at local address ``local + (a - start)`` and guest-physical address
        ``gpa + (a - start)`` (what the dirty log needs): one IOTLB entry (if
        the IOTLB is on) intersected with one memory region. This is what the
        C burst loops cache; they never translate by themselves. ``ring``
        picks the ring address space (front-end virtual without the IOTLB).
        Raises what :meth:`buffer` raises for the byte at ``addr``.
        """
        iotlb, table = self._iotlb, self.table
        if iotlb is None:
            region = _region_holding(table, addr, uaddr=ring)
            base = region.uaddr if ring else region.gpa
            return base, base + region.size, _local(region), region.gpa
        stats = iotlb.stats
        stats.lookups += 1
        entry = iotlb.entry_at(addr)
        if entry is None:
            stats.misses += 1
            raise IotlbMiss(addr, IotlbPerm(perm))
        start, end, uaddr, have = entry
        if perm & ~have:
            stats.denied += 1
            raise IotlbDenied(addr, IotlbPerm(perm), IotlbPerm(have))
        stats.hits += 1
        here = uaddr + (addr - start)
        region = _region_holding(table, here, uaddr=True)
        # Clip the entry to the region: both map linearly, so their intersection does.
        lo = max(start, addr - (here - region.uaddr))
        hi = min(end, addr + (region.uaddr + region.size - here))
        offset = here - region.uaddr - (addr - lo)  # of lo, in the region
        return lo, hi, _local(region) + offset, region.gpa + offset

    def gpa_of(self, view: memoryview) -> int:
        """The guest-physical address of a view this door handed out (for the dirty log)."""
        here = local_address(view)
        for region in self.table:
            local = _local(region)
            if local <= here < local + region.size:
                return region.gpa + (here - local)
        raise OutsideMemory(f"a view at {here:#x} is in no region")

    def ring(self, addr: int, size: int, perm: IotlbPerm) -> memoryview:
        """A ring (desc, avail or used) as one contiguous view."""
        try:
            iotlb = self._iotlb
            if iotlb is None:
                return self.table.uaddr_view(addr, size)
            return self.table.uaddr_view(iotlb.translate(addr, size, perm), size)
        except (AddressFault, IotlbDiscontiguous, ValueError) as exc:
            raise OutsideMemory(str(exc)) from None


def _region_holding(table: MemoryTable, addr: int, *, uaddr: bool) -> MappedRegion:
    for region in table:
        base = region.uaddr if uaddr else region.gpa
        if base <= addr < base + region.size:
            return region
    space = "front-end virtual" if uaddr else "guest physical"
    raise OutsideMemory(str(AddressFault(addr, 1, space)))


def _local(region: MappedRegion) -> int:
    """This process's address of the region's first byte."""
    return int(ffi.cast("uintptr_t", region._ptr)) + region.mmap_offset
