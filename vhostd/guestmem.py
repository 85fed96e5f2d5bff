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
from .memory import AddressFault, MemoryTable

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

    __slots__ = ("iotlb", "table")

    def __init__(self, table: MemoryTable, iotlb: IoTlb | None = None) -> None:
        self.table = table
        self.iotlb = iotlb

    @property
    def generation(self) -> tuple[int, int]:
        """Changes whenever a view obtained earlier may have become stale."""
        iotlb = self.iotlb
        return (self.table.generation, iotlb.generation if iotlb is not None else 0)

    def buffer(self, addr: int, size: int, perm: IotlbPerm) -> memoryview:
        """A descriptor's buffer as one contiguous view.

        Raises :class:`IotlbMiss` (retry after the front-end answers),
        :class:`IotlbDenied` or :class:`OutsideMemory`. A buffer whose
        translation is split across regions raises :class:`OutsideMemory`
        too; callers that can gather use :meth:`buffer_segments`.
        """
        try:
            iotlb = self.iotlb
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
        iotlb, table = self.iotlb, self.table
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

    def ring(self, addr: int, size: int, perm: IotlbPerm) -> memoryview:
        """A ring (desc, avail or used) as one contiguous view."""
        try:
            iotlb = self.iotlb
            if iotlb is None:
                return self.table.uaddr_view(addr, size)
            return self.table.uaddr_view(iotlb.translate(addr, size, perm), size)
        except (AddressFault, IotlbDiscontiguous, ValueError) as exc:
            raise OutsideMemory(str(exc)) from None
