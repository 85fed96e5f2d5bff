"""The front-end's memory regions, mapped into this process.

The front-end (QEMU, DPDK virtio-user) shares its guest RAM as file
descriptors. Each region is known by three addresses: the guest physical
address, the front-end's own virtual address (``userspace_addr``) and an
offset into the fd. This module maps the fds with ``mmap`` through cffi and
turns either kind of address into a local memoryview, never past a region's
end. It knows nothing of rings or of the IOTLB: ``guestmem`` builds on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from protocol.payloads import MemoryRegion

from .native import ffi, lib

U64_END = 1 << 64

log = logging.getLogger(__name__)

_SPACES = {"gpa": "guest physical", "uaddr": "front-end virtual"}


class _Reservation:
    """An address range this process mapped, unmapped once nothing can reach it.

    Owned by the cdata pointer of the mapping (``ffi.gc``): every view sliced
    from the region keeps that pointer alive, so the range cannot be handed
    to another mapping while a forgotten view still points into it.
    """

    lingering = 0
    """Ranges retired by ``MappedRegion.unmap`` that something still references."""

    __slots__ = ("length", "retired")

    def __init__(self, length: int) -> None:
        self.length = length
        self.retired = False

    def retire(self, ptr: object) -> None:
        """Drop the guest's pages now; keep the range as empty private pages."""
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED | lib.MAP_NORESERVE
        got = lib.mmap(ptr, self.length, lib.PROT_READ | lib.PROT_WRITE, flags, -1, 0)
        if int(ffi.cast("uintptr_t", got)) != int(ffi.cast("uintptr_t", ptr)):
            # Still the guest's pages, but still ours alone until collected.
            log.error("could not retire a mapping: %s", os.strerror(ffi.errno))
        self.retired = True
        _Reservation.lingering += 1

    def release(self, ptr: object) -> None:
        lib.munmap(ptr, self.length)
        if self.retired:
            _Reservation.lingering -= 1


def lingering_mappings() -> int:
    """Regions unmapped but still reachable from some Python object (0 when all is well)."""
    return _Reservation.lingering


class MemoryError_(Exception):
    """A region the front-end described cannot be used."""


class AddressFault(Exception):
    """An address, or part of a range, lies outside every mapped region."""

    def __init__(self, addr: int, size: int, space: str) -> None:
        super().__init__(f"{space} range {addr:#x}+{size:#x} is not inside one mapped region")
        self.addr = addr
        self.size = size
        self.space = space


@dataclass(eq=False, slots=True)
class MappedRegion:
    """One region's mapping: its addresses and a memoryview over its bytes."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    view: memoryview
    _ptr: object = field(repr=False)
    _reservation: _Reservation = field(repr=False)

    @classmethod
    def map(cls, region: MemoryRegion, fd: int) -> MappedRegion:
        """Map ``region`` from ``fd``; the caller keeps ownership of ``fd``."""
        size, offset = region.memory_size, region.mmap_offset
        if size == 0:
            raise MemoryError_("region of size 0")
        for name, base in (
            ("guest_phys_addr", region.guest_phys_addr),
            ("userspace_addr", region.userspace_addr),
            ("mmap_offset", offset),
        ):
            if base + size > U64_END:
                raise MemoryError_(f"{name} {base:#x} + size {size:#x} overflows 64 bits")
        length = offset + size
        ptr = lib.mmap(ffi.NULL, length, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if int(ffi.cast("intptr_t", ptr)) == -1:
            err = ffi.errno
            raise MemoryError_(f"mmap of {length:#x} bytes failed: {os.strerror(err)}")
        lib.madvise(ptr, length, lib.MADV_DONTDUMP)
        reservation = _Reservation(length)
        ptr = ffi.gc(ptr, reservation.release)
        view = memoryview(ffi.buffer(ptr, length))[offset:]
        return cls(
            region.guest_phys_addr, size, region.userspace_addr, offset, view, ptr, reservation
        )

    def unmap(self) -> None:
        """Give the guest's memory back now; the view must not be used afterwards.

        The address range itself stays reserved, backed by empty private
        pages, until the last Python object that could reach it (a view
        sliced from ours, a cdata over one) is gone: a view that outlived its
        region by mistake then reads zeros and writes into nothing, instead
        of into whatever the process mapped next at that address.
        """
        if not self._reservation.retired:
            self.view.release()
            self._reservation.retire(self._ptr)

    def overlaps(self, other: MappedRegion) -> bool:
        return (self.gpa < other.gpa + other.size and other.gpa < self.gpa + self.size) or (
            self.uaddr < other.uaddr + other.size and other.uaddr < self.uaddr + self.size
        )

    def describes(self, region: MemoryRegion) -> bool:
        return (
            self.gpa == region.guest_phys_addr
            and self.size == region.memory_size
            and self.uaddr == region.userspace_addr
        )


class MemoryTable:
    """The set of mapped regions of one front-end connection.

    Lookups scan a handful of regions (QEMU sends at most 8, a few dozen with
    memory slots) after checking the last hit, which is nearly always right.
    ``generation`` changes whenever a region goes away, so anything that
    cached a view into guest memory knows to look again.
    """

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[MappedRegion] = []
        self._last_gpa: MappedRegion | None = None
        self._last_uaddr: MappedRegion | None = None
        self.generation = 0

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self._regions)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self._regions)

    def replace(self, regions: Iterable[MemoryRegion], fds: list[int]) -> None:
        """Map a whole new table (SET_MEM_TABLE); all-or-nothing."""
        new: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                new.append(self._checked(MappedRegion.map(region, fd), new))
        except BaseException:
            for mapped in new:
                mapped.unmap()
            raise
        self.clear()
        self._regions = new

    def add(self, region: MemoryRegion, fd: int) -> None:
        """Map one more region (ADD_MEM_REG)."""
        if len(self._regions) >= self.max_regions:
            raise MemoryError_(f"all {self.max_regions} memory slots are in use")
        mapped = MappedRegion.map(region, fd)
        try:
            self._regions.append(self._checked(mapped, self._regions))
        except BaseException:
            mapped.unmap()
            raise

    def remove(self, region: MemoryRegion) -> None:
        """Unmap the region that ``region`` describes (REM_MEM_REG)."""
        for i, mapped in enumerate(self._regions):
            if mapped.describes(region):
                del self._regions[i]
                self._forget()
                mapped.unmap()
                return
        raise MemoryError_(
            f"no region at gpa {region.guest_phys_addr:#x} size {region.memory_size:#x}"
        )

    def clear(self) -> None:
        """Unmap everything; safe to call on every way out of a connection."""
        regions, self._regions = self._regions, []
        self._forget()
        for mapped in regions:
            mapped.unmap()

    def _forget(self) -> None:
        self._last_gpa = self._last_uaddr = None
        self.generation += 1

    def _checked(self, mapped: MappedRegion, others: list[MappedRegion]) -> MappedRegion:
        for other in others:
            if mapped.overlaps(other):
                mapped.unmap()
                raise MemoryError_(
                    f"region gpa {mapped.gpa:#x}+{mapped.size:#x} overlaps "
                    f"region gpa {other.gpa:#x}+{other.size:#x}"
                )
        return mapped

    def gpa_view(self, gpa: int, size: int) -> memoryview:
        """A view of guest physical ``[gpa, gpa+size)``, inside one region."""
        r = self._last_gpa
        if r is None or not (r.gpa <= gpa and gpa + size <= r.gpa + r.size):
            r = self._last_gpa = self._holding(gpa, size, "gpa")
        start = gpa - r.gpa
        return r.view[start : start + size]

    def uaddr_view(self, uaddr: int, size: int) -> memoryview:
        """A view of front-end virtual ``[uaddr, uaddr+size)``, inside one region."""
        r = self._last_uaddr
        if r is None or not (r.uaddr <= uaddr and uaddr + size <= r.uaddr + r.size):
            r = self._last_uaddr = self._holding(uaddr, size, "uaddr")
        start = uaddr - r.uaddr
        return r.view[start : start + size]

    def gpa_span(self, gpa: int) -> int:
        """How many bytes from ``gpa`` stay inside its region (0 if unmapped)."""
        return self._span(gpa, "gpa")

    def uaddr_span(self, uaddr: int) -> int:
        """How many bytes from ``uaddr`` stay inside its region (0 if unmapped)."""
        return self._span(uaddr, "uaddr")

    # The views above check the last region they used inline (the hot path);
    # these scan, for either address space named by its MappedRegion field.

    def _holding(self, addr: int, size: int, space: str) -> MappedRegion:
        for r in self._regions:
            base: int = getattr(r, space)
            if base <= addr < base + r.size:
                if addr + size > base + r.size:
                    break
                return r
        raise AddressFault(addr, size, _SPACES[space])

    def _span(self, addr: int, space: str) -> int:
        for r in self._regions:
            base: int = getattr(r, space)
            if base <= addr < base + r.size:
                return base + r.size - addr
        return 0
