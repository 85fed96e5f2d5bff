"""Guest RAM for the front-end simulator.

The back-end maps guest RAM from the fds we send, so RAM must be a real
memfd.  Each region has a guest-physical base and a fake front-end user
address (what QEMU would put in ``userspace_addr``) so tests can tell the
two address spaces apart: a back-end that confuses gpa and uaddr fails.

Because the simulator writes RAM only through :meth:`GuestRam.write`, a
shadow copy taken when the canary is armed tells exactly which bytes the
*back-end* changed; :meth:`GuestRam.canary_violations` reports the ones it
was not allowed to change.  Reads cannot be observed, so :meth:`poison`
places recognisable bytes where a malicious descriptor points; a test then
asserts that output never contains them.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

PAGE = 4096
DEFAULT_UADDR_BASE = 0x7F00_0000_0000
CANARY_BYTE = 0xA5


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(slots=True)
class RamRegion:
    """One guest memory region, backed by (a slice of) a memfd."""

    gpa: int
    size: int
    uaddr: int
    fd: int
    mmap_offset: int
    mem: mmap.mmap

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.gpa_end


@dataclass(slots=True, frozen=True)
class Violation:
    """A run of bytes the back-end changed outside the writable areas."""

    gpa: int
    size: int
    before: bytes
    after: bytes


@dataclass(slots=True)
class _Allocator:
    """First-fit allocator over free intervals (gpa, end), kept sorted."""

    free: list[tuple[int, int]] = field(default_factory=list)
    used: dict[int, int] = field(default_factory=dict)

    def alloc(self, size: int, align: int) -> int:
        for i, (start, end) in enumerate(self.free):
            base = align_up(start, align)
            if base + size <= end:
                pieces = []
                if start < base:
                    pieces.append((start, base))
                if base + size < end:
                    pieces.append((base + size, end))
                self.free[i : i + 1] = pieces
                self.used[base] = size
                return base
        raise MemoryError(f"guest RAM exhausted ({size:#x} bytes, align {align:#x})")

    def release(self, gpa: int) -> None:
        size = self.used.pop(gpa)
        self.free.append((gpa, gpa + size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for start, end in self.free:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self.free = merged


class GuestRam:
    """Guest RAM made of one or more memfd regions, possibly with gaps.

    ``layout`` lists (gpa, size) pairs; both must be page aligned.  With
    ``one_fd`` all regions share one memfd at increasing offsets (as QEMU does
    for one RAM block split around a hole), so ``mmap_offset`` is non-zero.
    """

    def __init__(
        self,
        layout: list[tuple[int, int]] | None = None,
        *,
        uaddr_base: int = DEFAULT_UADDR_BASE,
        one_fd: bool = False,
    ) -> None:
        layout = layout or [(0, 16 << 20)]
        self.regions: list[RamRegion] = []
        self._alloc = _Allocator()
        self._shadow: dict[int, bytearray] | None = None
        self._settled: set[int] = set()
        self._writable: list[tuple[int, int]] = []
        self._poison: list[bytes] = []
        shared_fd = -1
        offset = 0
        if one_fd:
            shared_fd = os.memfd_create("vusim-ram", os.MFD_CLOEXEC)
            os.ftruncate(shared_fd, sum(size for _, size in layout))
        for gpa, size in sorted(layout):
            if gpa % PAGE or size % PAGE or size == 0:
                raise ValueError(f"region {gpa:#x}+{size:#x} not page aligned")
            if self.regions and gpa < self.regions[-1].gpa_end:
                raise ValueError("regions overlap")
            if one_fd:
                fd, mmap_offset = shared_fd, offset
            else:
                fd, mmap_offset = os.memfd_create("vusim-ram", os.MFD_CLOEXEC), 0
                os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=mmap_offset)
            self.regions.append(RamRegion(gpa, size, uaddr_base + gpa, fd, mmap_offset, mem))
            self._alloc.free.append((gpa, gpa + size))
            offset += size

    def close(self) -> None:
        fds = {r.fd for r in self.regions}
        for region in self.regions:
            region.mem.close()
        for fd in fds:
            os.close(fd)
        self.regions = []

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- address spaces -------------------------------------------------
    def region_of(self, gpa: int, size: int = 1) -> RamRegion:
        for region in self.regions:
            if region.contains(gpa, size):
                return region
        raise ValueError(f"gpa {gpa:#x}+{size:#x} not inside one RAM region")

    def gpa_to_uaddr(self, gpa: int) -> int:
        region = self.region_of(gpa)
        return region.uaddr + (gpa - region.gpa)

    def uaddr_to_gpa(self, uaddr: int) -> int:
        for region in self.regions:
            if region.uaddr <= uaddr < region.uaddr + region.size:
                return region.gpa + (uaddr - region.uaddr)
        raise ValueError(f"uaddr {uaddr:#x} not in RAM")

    def gaps(self) -> list[tuple[int, int]]:
        """Guest-physical holes between regions (gpa, size)."""
        return [
            (a.gpa_end, b.gpa - a.gpa_end)
            for a, b in zip(self.regions, self.regions[1:], strict=False)
            if b.gpa > a.gpa_end
        ]

    # -- bytes ----------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        region = self.region_of(gpa, size)
        off = gpa - region.gpa
        return region.mem[off : off + size]

    def write(self, gpa: int, data: bytes) -> None:
        """Driver-side write: also updates the canary shadow."""
        region = self.region_of(gpa, len(data))
        off = gpa - region.gpa
        region.mem[off : off + len(data)] = data
        if self._shadow is not None:
            self._shadow[region.gpa][off : off + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFF).to_bytes(2, "little"))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    # -- allocation -----------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes inside one region; returns the gpa."""
        return self._alloc.alloc(max(size, 1), align)

    def free(self, gpa: int) -> None:
        self._alloc.release(gpa)

    def alloc_at(self, gpa: int, size: int) -> int:
        """Reserve a chosen range (e.g. the last bytes before a gap)."""
        for i, (start, end) in enumerate(self._alloc.free):
            if start <= gpa and gpa + size <= end:
                pieces = [p for p in ((start, gpa), (gpa + size, end)) if p[0] < p[1]]
                self._alloc.free[i : i + 1] = pieces
                self._alloc.used[gpa] = size
                return gpa
        raise MemoryError(f"{gpa:#x}+{size:#x} is not free")

    # -- canary ---------------------------------------------------------
    def arm_canary(self, *, fill_free: bool = True, pattern: int = CANARY_BYTE) -> None:
        """Fill unallocated RAM with ``pattern`` and start tracking changes.

        From now on any byte that differs from what the simulator wrote is a
        back-end write; :meth:`allow_device_write` declares where that is fine.
        """
        if fill_free:
            for start, end in self._alloc.free:
                region = self.region_of(start, end - start)
                off = start - region.gpa
                region.mem[off : off + end - start] = bytes([pattern]) * (end - start)
        self._shadow = {r.gpa: bytearray(r.mem[:]) for r in self.regions}
        self._settled = set()

    def allow_device_write(self, gpa: int, size: int) -> None:
        self._writable.append((gpa, gpa + size))

    def disallow_device_write(self, gpa: int, size: int) -> None:
        self._writable.remove((gpa, gpa + size))

    def device_writes(self) -> list[tuple[int, int]]:
        """Every run (gpa, size) the back-end changed since arming."""
        if self._shadow is None:
            raise RuntimeError("canary not armed")
        runs: list[tuple[int, int]] = []
        chunk = 4096
        for region in self.regions:
            shadow = self._shadow[region.gpa]
            for base in range(0, region.size, chunk):
                now = region.mem[base : base + chunk]
                if now == shadow[base : base + chunk]:
                    continue
                for i, (a, b) in enumerate(zip(now, shadow[base : base + chunk], strict=True)):
                    if a != b:
                        gpa = region.gpa + base + i
                        if runs and runs[-1][0] + runs[-1][1] == gpa:
                            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                        else:
                            runs.append((gpa, 1))
        return runs

    def canary_violations(self) -> list[Violation]:
        """Back-end writes outside the areas allowed with allow_device_write."""
        assert self._shadow is not None
        bad: list[Violation] = []
        for gpa, size in self.device_writes():
            for byte in range(gpa, gpa + size):
                if any(lo <= byte < hi for lo, hi in self._writable):
                    continue
                if bad and bad[-1].gpa + bad[-1].size == byte:
                    last = bad[-1]
                    bad[-1] = Violation(last.gpa, last.size + 1, b"", b"")
                else:
                    bad.append(Violation(byte, 1, b"", b""))
        return [self._describe(v.gpa, v.size) for v in bad]

    def _describe(self, gpa: int, size: int) -> Violation:
        assert self._shadow is not None
        region = self.region_of(gpa, size)
        off = gpa - region.gpa
        before = bytes(self._shadow[region.gpa][off : off + size])
        return Violation(gpa, size, before, self.read(gpa, size))

    def settle(self, gpa: int, size: int) -> None:
        """Accept what the back-end wrote in one area (e.g. a completed RX buffer).

        The pages it changed there stay in :meth:`device_pages`.
        """
        if self._shadow is not None:
            region = self.region_of(gpa, size)
            off = gpa - region.gpa
            shadow = self._shadow[region.gpa]
            now = region.mem[off : off + size]
            for i, (a, b) in enumerate(zip(now, shadow[off : off + size], strict=True)):
                if a != b:
                    self._settled.add((gpa + i) // PAGE)
            shadow[off : off + size] = now

    def device_pages(self) -> set[int]:
        """Every guest page the back-end changed since arming (settled areas included)."""
        pages = set(self._settled)
        for gpa, size in self.device_writes():
            pages.update(range(gpa // PAGE, (gpa + size - 1) // PAGE + 1))
        return pages

    def accept_device_writes(self) -> None:
        """Fold the current contents into the shadow (after checking them)."""
        if self._shadow is not None:
            self._shadow = {r.gpa: bytearray(r.mem[:]) for r in self.regions}

    # -- poison ---------------------------------------------------------
    def poison(self, size: int = PAGE, *, gpa: int | None = None) -> int:
        """Fill an area with a unique marker that must never leave the guest."""
        if gpa is None:
            gpa = self.alloc(size, PAGE)
        else:
            self.alloc_at(gpa, size)
        tag = f"POISON{len(self._poison):02d}".encode()[:8].ljust(8, b"!")
        self._poison.append(tag)
        self.write(gpa, (tag * (size // 8 + 1))[:size])
        return gpa

    def leaked_poison(self, data: bytes) -> bool:
        """True when ``data`` carries bytes copied from a poison area."""
        return any(tag[i:] + tag[:i] in data for tag in self._poison for i in range(len(tag)))
