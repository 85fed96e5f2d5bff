"""The front-end's memory regions, mapped into this process.

The front-end (QEMU, DPDK virtio-user) shares its guest RAM as file
descriptors. Each region is known by three addresses: the guest physical
address, the front-end's own virtual address (``userspace_addr``) and an
offset into the fd. This module maps the fds with ``mmap`` through cffi and
turns either kind of address into a local memoryview, never past a region's
end. It knows nothing of rings or of the IOTLB: ``guestmem`` builds on it.

A front-end could announce more memory than its file holds, or shrink the
file later: touching a page past a file's end raises SIGBUS, which would
kill the daemon and every guest's network with it. So every fd is checked
against its real size before it is mapped (:func:`map_guest_file`, for any
mapping of a front-end's file), and a file that can still shrink (not
sealed with ``F_SEAL_SHRINK``; QEMU seals its memfds) is mapped under the
SIGBUS guard of ``csrc/guard.c``: a vanished page turns into zeros, and the
table's eventfd tells the session (:meth:`MemoryTable.wait_lost`) to close
that connection.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import trio

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

    __slots__ = ("fenced", "guard", "length", "reserved", "retired")

    def __init__(self, length: int, reserved: object, fenced: int, guard: int = -1) -> None:
        self.length = length
        self.reserved = reserved
        """The whole reservation: the mapping with its inaccessible fences."""
        self.fenced = fenced
        self.retired = False
        self.guard = guard
        """The SIGBUS guard slot watching the range (-1: none)."""

    @property
    def lost(self) -> bool:
        """True once the guard replaced the range with zeros (its file shrank)."""
        return self.guard >= 0 and bool(lib.vhostd_guard_lost(self.guard))

    def unguard(self) -> None:
        if self.guard >= 0:
            lib.vhostd_guard_unregister(self.guard)
            self.guard = -1

    def retire(self, ptr: object) -> None:
        """Drop the guest's pages now; keep the range as empty private pages."""
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED | lib.MAP_NORESERVE
        got = lib.mmap(ptr, self.length, lib.PROT_READ | lib.PROT_WRITE, flags, -1, 0)
        if int(ffi.cast("uintptr_t", got)) != int(ffi.cast("uintptr_t", ptr)):
            # Still the guest's pages, but still ours alone until collected.
            log.error("could not retire a mapping: %s", os.strerror(ffi.errno))
        # Empty private pages cannot fault: the guard can let go (after, not
        # before, so no moment is left unguarded).
        self.unguard()
        self.retired = True
        _Reservation.lingering += 1

    def release(self, ptr: object) -> None:
        self.unguard()
        lib.munmap(self.reserved, self.fenced)
        if self.retired:
            _Reservation.lingering -= 1


def lingering_mappings() -> int:
    """Regions unmapped but still reachable from some Python object (0 when all is well)."""
    return _Reservation.lingering


def local_address(view: memoryview) -> int:
    """Where ``view`` starts in this process.

    The export ``from_buffer`` takes is given back at once: a memoryview
    still exported when the garbage collector clears it in a cycle crashes
    CPython (3.11) in its later deallocation, and ring views sit in cycles.
    """
    with ffi.from_buffer("uint8_t[]", view) as ptr:
        return int(ffi.cast("uintptr_t", ptr))


class MemoryError_(Exception):
    """A region the front-end described cannot be used."""


_FILE_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "pipe"),
    (stat.S_ISSOCK, "socket"),
)


def check_backing(fd: int, offset: int, size: int, what: str) -> bool:
    """Refuse ``fd`` unless bytes ``[offset, offset+size)`` lie inside the file; can it shrink?

    Guest memory comes as a regular file (memfd, hugetlbfs, /dev/shm); a
    mapping past its end would fault with SIGBUS at the first touch. ``what``
    names the mapping in the error ("region gpa ..."). Returns whether the
    file may still shrink under a mapping (no ``F_SEAL_SHRINK`` seal).
    """
    # Seals first: once F_SEAL_SHRINK is on, the size fstat reports holds for
    # good; read after it, a seal could come with a truncate in between.
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd (hugetlbfs, /dev/shm): nothing stops a truncate
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise MemoryError_(f"{what}: its fd cannot be examined: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special file")
        raise MemoryError_(
            f"{what}: its fd is a {kind}, not a regular file "
            "(guest memory must be a memfd, hugetlbfs or shared-memory file)"
        )
    if offset >= st.st_size:
        raise MemoryError_(
            f"{what}: mmap_offset {offset:#x} is beyond the end of its file ({st.st_size:#x} bytes)"
        )
    if offset + size > st.st_size:
        raise MemoryError_(
            f"{what} does not fit in its file: it needs bytes up to {offset + size:#x}, "
            f"the file has {st.st_size:#x}"
        )
    return not seals & fcntl.F_SEAL_SHRINK


def map_guest_file(
    fd: int, offset: int, size: int, what: str, notify_fd: int = -1
) -> tuple[object, _Reservation, bool]:
    """Map a front-end's file shared, read-write, from 0 to ``offset + size``.

    The one way vhostd maps a front-end's fd (memory regions; the dirty log
    when it comes): checked by :func:`check_backing`, then, if the file can
    shrink, registered with the SIGBUS guard, which writes ``notify_fd`` if
    the file loses pages under the mapping. Returns the pointer (unmapped
    when collected), its reservation, and whether the file can shrink.
    """
    can_shrink = check_backing(fd, offset, size, what)
    length = offset + size
    reserved, fenced, raw = _fenced_mmap(fd, length, os.fstat(fd).st_blksize, what)
    guard = -1
    if can_shrink:
        guard = lib.vhostd_guard_register(ffi.cast("uint8_t *", raw), length, notify_fd)
        if guard < 0:
            err = ffi.errno
            lib.munmap(reserved, fenced)
            if guard == -1:
                raise MemoryError_(
                    f"{what}: its file is not sealed against shrinking and all "
                    f"{lib.VHOSTD_GUARD_SLOTS} guarded mappings are in use"
                )
            raise MemoryError_(f"cannot install the SIGBUS handler: {os.strerror(err)}")
    lib.madvise(raw, length, lib.MADV_DONTDUMP)
    reservation = _Reservation(length, reserved, fenced, guard)
    return ffi.gc(raw, reservation.release), reservation, can_shrink


def _fenced_mmap(fd: int, length: int, block: int, what: str) -> tuple[object, int, object]:
    """Map ``fd`` shared between two inaccessible fences of at least a page.

    An access that runs off either end of guest memory faults at once
    instead of reading or writing whatever this process mapped next door.
    The file goes at an address aligned to its block size (a hugetlbfs file
    maps only at huge-page boundaries). Returns the reservation, its length
    and the mapping's start.
    """
    fence = max(4096, block)
    total = length + 3 * fence
    none = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE
    reserved = lib.mmap(ffi.NULL, total, lib.PROT_NONE, none, -1, 0)
    if int(ffi.cast("intptr_t", reserved)) == -1:
        err = ffi.errno
        raise MemoryError_(f"{what}: cannot reserve {total:#x} bytes: {os.strerror(err)}")
    base = int(ffi.cast("uintptr_t", reserved))
    start = (base + 2 * fence - 1) // fence * fence
    flags = lib.MAP_SHARED | lib.MAP_FIXED
    rw = lib.PROT_READ | lib.PROT_WRITE
    raw = lib.mmap(ffi.cast("void *", start), length, rw, flags, fd, 0)
    if int(ffi.cast("intptr_t", raw)) == -1:
        err = ffi.errno
        lib.munmap(reserved, total)
        raise MemoryError_(f"{what}: mmap of {length:#x} bytes failed: {os.strerror(err)}")
    return reserved, total, raw


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
    can_shrink: bool
    """Its file is not sealed against shrinking: the SIGBUS guard watches it."""
    _ptr: object = field(repr=False)
    _reservation: _Reservation = field(repr=False)

    @classmethod
    def map(cls, region: MemoryRegion, fd: int, notify_fd: int = -1) -> MappedRegion:
        """Map ``region`` from ``fd``; the caller keeps ownership of ``fd``.

        ``notify_fd`` (an eventfd) is written if the file shrinks under the mapping.
        """
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
        what = f"region gpa {region.guest_phys_addr:#x}+{size:#x} (mmap_offset {offset:#x})"
        ptr, reservation, can_shrink = map_guest_file(fd, offset, size, what, notify_fd)
        view = memoryview(ffi.buffer(ptr, offset + size))[offset:]
        return cls(
            region.guest_phys_addr,
            size,
            region.userspace_addr,
            offset,
            view,
            can_shrink,
            ptr,
            reservation,
        )

    @property
    def where(self) -> str:
        return f"gpa {self.gpa:#x}+{self.size:#x}"

    @property
    def lost(self) -> bool:
        """True once its file shrank under it (the guard put zeros in its place)."""
        return self._reservation.lost

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

    The table owns one eventfd, opened with the first mapping or the first
    :meth:`wait_lost` and closed by :meth:`clear`: the SIGBUS guard writes it
    when a region's file shrinks under its mapping.
    """

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[MappedRegion] = []
        self._last_gpa: MappedRegion | None = None
        self._last_uaddr: MappedRegion | None = None
        self.generation = 0
        self._notify: int | None = None
        self._vanished: list[str] = []
        """Lost regions already unmapped (a new table came before the session looked)."""
        self._watched: dict[str, _Reservation] = {}
        """Other mappings of the connection the guard watches (the dirty log)."""

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self._regions)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def unsealed(self) -> int:
        """Regions whose file can shrink (not sealed): guarded against SIGBUS."""
        return sum(r.can_shrink for r in self._regions)

    def watch(self, name: str, reservation: _Reservation | None) -> None:
        """Report ``name`` in :meth:`lost` when that mapping's file shrinks (None: stop)."""
        if reservation is None:
            self._watched.pop(name, None)
        else:
            self._watched[name] = reservation

    def notify_fd(self) -> int:
        """The eventfd the guard writes for this connection's mappings."""
        if self._notify is None:
            self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self._notify

    def lost(self) -> list[str]:
        """The regions (``gpa A+S``) whose file shrank under their mapping, if any."""
        watched = [name for name, res in self._watched.items() if res.lost]
        return self._vanished + [r.where for r in self._regions if r.lost] + watched

    async def wait_lost(self) -> list[str]:
        """Wait until guest memory vanished under a mapping; :meth:`lost` then.

        Must be cancelled before :meth:`clear` closes the eventfd it waits on.
        """
        fd = self.notify_fd()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            lost = self.lost()
            if lost:
                return lost

    def replace(self, regions: Iterable[MemoryRegion], fds: list[int]) -> None:
        """Map a whole new table (SET_MEM_TABLE); all-or-nothing."""
        new: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                mapped = MappedRegion.map(region, fd, self.notify_fd())
                new.append(self._checked(mapped, new))
        except BaseException:
            for mapped in new:
                self._unmap(mapped)
            raise
        self._unmap_all()
        self._regions = new

    def add(self, region: MemoryRegion, fd: int) -> None:
        """Map one more region (ADD_MEM_REG)."""
        if len(self._regions) >= self.max_regions:
            raise MemoryError_(f"all {self.max_regions} memory slots are in use")
        mapped = MappedRegion.map(region, fd, self.notify_fd())
        try:
            self._regions.append(self._checked(mapped, self._regions))
        except BaseException:
            self._unmap(mapped)
            raise

    def remove(self, region: MemoryRegion) -> None:
        """Unmap the region that ``region`` describes (REM_MEM_REG)."""
        for i, mapped in enumerate(self._regions):
            if mapped.describes(region):
                del self._regions[i]
                self._forget()
                self._unmap(mapped)
                return
        raise MemoryError_(
            f"no region at gpa {region.guest_phys_addr:#x} size {region.memory_size:#x}"
        )

    def clear(self) -> None:
        """Unmap everything, close the eventfd; safe to call on every way out of a connection."""
        self._unmap_all()
        self._vanished.clear()
        if self._notify is not None:
            os.close(self._notify)
            self._notify = None

    def _unmap_all(self) -> None:
        regions, self._regions = self._regions, []
        self._forget()
        for mapped in regions:
            self._unmap(mapped)

    def _unmap(self, mapped: MappedRegion) -> None:
        if mapped.lost:
            self._vanished.append(mapped.where)
        mapped.unmap()

    def _forget(self) -> None:
        self._last_gpa = self._last_uaddr = None
        self.generation += 1

    def _checked(self, mapped: MappedRegion, others: list[MappedRegion]) -> MappedRegion:
        for other in others:
            if mapped.overlaps(other):
                self._unmap(mapped)
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
