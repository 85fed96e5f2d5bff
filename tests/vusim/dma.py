"""How the guest driver turns a gpa into the address the device sees.

Without ACCESS_PLATFORM, descriptors carry guest-physical addresses but
SET_VRING_ADDR carries QEMU's *user* addresses; with it, both are IOVAs that
the driver mapped in the vIOMMU.  Rings and the net helpers ask a ``Dma``
object and stay ignorant of which case they are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from protocol import IotlbPerm

from .guestram import PAGE, GuestRam
from .viommu import IovaAllocator, VIommu


class Dma(Protocol):
    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        """Descriptor address for a buffer."""
        ...

    def unmap_buffer(self, addr: int, size: int) -> None: ...

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        """Address for SET_VRING_ADDR."""
        ...


@dataclass(slots=True)
class PhysicalDma:
    """No vIOMMU: gpa in descriptors, front-end uaddr for ring addresses."""

    ram: GuestRam

    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        return gpa

    def unmap_buffer(self, addr: int, size: int) -> None:
        pass

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        return self.ram.gpa_to_uaddr(gpa)


@dataclass(slots=True)
class IommuDma:
    """vIOMMU on: every buffer gets its own IOVA window, mapped page by page.

    The page offset of the gpa is kept (as the Linux DMA API does), so a
    buffer that crosses a page boundary needs two pages and two misses.
    """

    viommu: VIommu
    iovas: IovaAllocator = field(default_factory=IovaAllocator)

    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        first = gpa & ~(PAGE - 1)
        span = ((gpa + size + PAGE - 1) & ~(PAGE - 1)) - first
        iova = self.iovas.take(span)
        self.viommu.map_pages(iova, first, span, perm)
        return iova + (gpa - first)

    def unmap_buffer(self, addr: int, size: int) -> None:
        first = addr & ~(PAGE - 1)
        self.viommu.unmap(first, ((addr + size + PAGE - 1) & ~(PAGE - 1)) - first)

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        return self.map_buffer(gpa, size, perm)
