"""The front-end's side of the dirty log: a bitmap in a memfd, as QEMU shares it.

One bit per 4 KiB page of guest-physical address. Sentinel bytes surround
the bitmap in the file, so a test can tell the back-end never wrote outside
the part it was given.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from .guestram import PAGE, GuestRam

SENTINEL = 0xA5


@dataclass
class DirtyBitmap:
    fd: int
    mem: mmap.mmap
    offset: int
    size: int

    @classmethod
    def create(cls, ram: GuestRam, size: int | None = None, offset: int = 0) -> DirtyBitmap:
        """A bitmap for ``ram`` (or of ``size`` bytes), at ``offset`` in a fresh memfd."""
        need = (max(r.gpa_end for r in ram.regions) // PAGE + 7) // 8
        size = need if size is None else size
        total = offset + size + PAGE
        fd = os.memfd_create("vusim-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, total)
        mem = mmap.mmap(fd, total, mmap.MAP_SHARED)
        mem[:offset] = bytes([SENTINEL]) * offset
        mem[offset + size :] = bytes([SENTINEL]) * (total - offset - size)
        return cls(fd, mem, offset, size)

    def dirty(self, gpa: int) -> bool:
        page = gpa // PAGE
        return bool(self.mem[self.offset + page // 8] >> (page % 8) & 1)

    def pages(self) -> set[int]:
        """Guest-physical page numbers whose bit is set."""
        out = set()
        bits = self.mem[self.offset : self.offset + self.size]
        for i, byte in enumerate(bits):
            if byte:
                out.update(8 * i + b for b in range(8) if byte >> b & 1)
        return out

    def clear(self) -> None:
        """What QEMU does after copying a round: forget every bit."""
        self.mem[self.offset : self.offset + self.size] = bytes(self.size)

    def sentinels_intact(self) -> bool:
        head = self.mem[: self.offset]
        tail = self.mem[self.offset + self.size :]
        return set(head) <= {SENTINEL} and set(tail) <= {SENTINEL}

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
