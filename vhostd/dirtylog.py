"""The dirty log of live migration, shared by the front-end with SET_LOG_BASE.

While QEMU migrates a guest it must know every guest page the back-end
changed: it shares a bitmap, one bit per 4 KiB page of guest-physical
address, and reads and clears it between copy rounds. vhostd sets the bit of
every page it writes (used ring entries and index, avail_event, RX headers
and payloads) before the write is published to the driver. The C loops do
it inline (``csrc/log.h``); the Python reference calls :meth:`DirtyLog.mark`,
the same C code.

The bitmap is mapped like guest memory (``memory.map_guest_file``): checked
against its file's size, fenced, and watched by the SIGBUS guard when its
file is not sealed, so a log that shrinks under us ends that connection, not
the daemon.
"""

from __future__ import annotations

from typing import Any

from .memory import MemoryError_, MemoryTable, map_guest_file
from .native import ffi, lib

PAGE = 4096
NAME = "dirty log"


class DirtyLog:
    """One SET_LOG_BASE mapping: ``size`` bytes of bitmap at ``offset`` in ``fd``."""

    __slots__ = ("_ptr", "_reservation", "_table", "c", "size")

    def __init__(self, fd: int, size: int, offset: int, table: MemoryTable) -> None:
        if size == 0:
            raise MemoryError_("dirty log of size 0")
        need = log_size(table)
        if size < need:
            raise MemoryError_(
                f"dirty log of {size:#x} bytes cannot cover the memory table "
                f"(guest-physical memory up to {need * 8 * PAGE:#x} needs {need:#x})"
            )
        ptr, self._reservation, _ = map_guest_file(fd, offset, size, NAME, table.notify_fd())
        self._ptr: Any = ptr
        self._table = table
        table.watch(NAME, self._reservation)
        self.size = size
        self.c: Any = ffi.new("struct vhostd_log *")
        self.c.bits = ffi.cast("uint8_t *", ptr) + offset
        self.c.pages = size * 8

    @property
    def logged(self) -> int:
        """Pages whose bit this process set (0 -> 1) in this log."""
        return int(self.c.logged)

    @property
    def overflow(self) -> int:
        """Writes past the bitmap's end (not logged: the bitmap is never overrun)."""
        return int(self.c.overflow)

    def covers(self, table: MemoryTable) -> bool:
        return self.size >= log_size(table)

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of the pages ``[gpa, gpa+length)`` touches."""
        lib.vhostd_log_mark(self.c, gpa, length)

    def close(self) -> None:
        """Stop logging into this bitmap; the queues were detached first."""
        self._table.watch(NAME, None)
        self.c.pages = 0  # anything still holding the struct logs nothing more
        self._reservation.retire(self._ptr)


def logged_pages(retired: int, live: DirtyLog | None) -> int:
    """Pages a port logged: its retired logs' count plus the live log's."""
    return retired + (live.logged if live is not None else 0)


def log_size(table: MemoryTable) -> int:
    """Bytes of bitmap the memory table needs: a bit for each page up to its end."""
    end = max((r.gpa + r.size for r in table), default=0)
    pages = (end + PAGE - 1) // PAGE
    return (pages + 7) // 8
