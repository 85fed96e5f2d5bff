"""The device side of a split virtqueue.

A :class:`SplitQueue` walks descriptor chains the driver made available and
returns them as used, through :class:`~vhostd.guestmem.GuestMemory` only. It
validates every chain as it reads it (each descriptor is read once, so a
driver that rewrites a descriptor after the check gains nothing) and keeps
the event-index bookkeeping that decides when to interrupt the driver and
when to ask it for kicks. It does not know it is serving a network device.

Chains are walked in two steps so that an IOTLB miss loses nothing:
:meth:`SplitQueue.peek` translates the next chain without consuming it, and
:meth:`SplitQueue.consume` commits it once the caller is done with it.
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import TYPE_CHECKING

from protocol.enums import IotlbPerm

from .guestmem import GuestMemory, OutsideMemory
from .memory import local_address

if TYPE_CHECKING:
    from .dirtylog import DirtyLog
from .native import lib

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
READ = IotlbPerm.READ
WRITE = IotlbPerm.WRITE

fence = lib.vhostd_fence


class QueueFault(StrEnum):
    """Why a driver's ring was refused; values are metric labels."""

    HEAD_RANGE = "head_out_of_range"
    NEXT_RANGE = "next_out_of_range"
    LOOP = "chain_loop_or_too_long"
    AVAIL_JUMP = "avail_index_jump"
    INDIRECT_LEN = "indirect_bad_length"
    INDIRECT_NESTED = "indirect_nested"
    INDIRECT_NEXT = "indirect_with_next"
    INDIRECT_OFF = "indirect_not_negotiated"
    DIRECTION = "wrong_descriptor_direction"
    TOO_LONG = "chain_too_long"
    RX_SMALL = "rx_buffer_too_small"
    UNMAPPED = "address_unmapped"
    DENIED = "access_denied"
    RING_UNMAPPED = "ring_unmapped"
    RING_MISALIGNED = "ring_misaligned"
    WRAP = "wrong_wrap_bits"
    """Packed: a descriptor of a chain is not available in the wrap of its position."""
    ID_RANGE = "buffer_id_out_of_range"
    """Packed: a chain's buffer id is not below the queue size."""


class QueueError(Exception):
    """The driver broke the ring; this queue must stop until it is reset."""

    def __init__(self, fault: QueueFault, detail: str) -> None:
        super().__init__(f"{fault.value}: {detail}")
        self.fault = fault


def ring_sizes(size: int, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring."""
    extra = 2 if event_idx else 0
    return 16 * size, 4 + 2 * size + extra, 4 + 8 * size + extra


class SplitQueue:
    """One started split ring: its addresses, indices and cached views."""

    packed = False

    __slots__ = (
        "_avail",
        "_desc",
        "_gen",
        "_used",
        "_used16",
        "avail_addr",
        "desc_addr",
        "event_idx",
        "first_avail",
        "index",
        "indirect",
        "last_avail",
        "last_used",
        "log",
        "log_used",
        "max_chain_bytes",
        "mem",
        "signalled_used",
        "signalled_valid",
        "size",
        "used_addr",
    )

    def __init__(
        self,
        index: int,
        size: int,
        mem: GuestMemory,
        *,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        base: int,
        event_idx: bool,
        indirect: bool,
        max_chain_bytes: int = 1 << 20,
    ) -> None:
        self.index = index
        self.size = size
        self.mem = mem
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain_bytes = max_chain_bytes
        self.last_avail = self.first_avail = base & 0xFFFF
        self.last_used = base & 0xFFFF
        self.signalled_used = 0
        self.signalled_valid = False
        self.log: DirtyLog | None = None
        """While set, every write to guest memory is logged (live migration)."""
        self.log_used = 0
        """The used ring's guest-physical address (for the log), found at refresh."""
        self._gen: tuple[int, int, int] | None = None
        self._desc = self._avail = self._used = self._used16 = memoryview(b"")

    @property
    def base(self) -> int:
        """What GET_VRING_BASE reports: where the driver should resume."""
        return self.last_avail

    # -- rings -------------------------------------------------------------

    def refresh(self) -> None:
        """Translate the rings again if anything may have moved since last time.

        Raises IotlbMiss when a ring is not (or no longer) mapped; the caller
        asks the front-end and retries, which is how rings get re-translated
        after an invalidation.
        """
        gen = self.mem.generation
        if gen == self._gen:
            return
        self.drop_views()
        dsize, asize, usize = ring_sizes(self.size, self.event_idx)
        try:
            desc = self.mem.ring(self.desc_addr, dsize, READ)
            avail = self.mem.ring(self.avail_addr, asize, READ)
            used = self.mem.ring(self.used_addr, usize, WRITE)
        except OutsideMemory as exc:
            raise QueueError(QueueFault.RING_UNMAPPED, str(exc)) from None
        for name, addr, view, align in (
            ("descriptor table", self.desc_addr, desc, 16),
            ("avail ring", self.avail_addr, avail, 2),
            ("used ring", self.used_addr, used, 4),
        ):
            # The driver's address, and where it landed here: index updates are
            # atomic stores, which need natural alignment.
            if addr % align or local_address(view) % align:
                raise QueueError(
                    QueueFault.RING_MISALIGNED,
                    f"{name} at {addr:#x} is not {align}-byte aligned",
                )
        if self.log is not None:
            # Within one region (a ring view never spans two), so contiguous.
            self.log_used = self.mem.gpa_of(used)
        self._desc, self._avail, self._used = desc, avail, used
        self._used16 = used.cast("H")
        self._gen = gen

    def set_log(self, log: DirtyLog | None) -> None:
        """Log into ``log`` from now on (None: stop); rings are looked up again first."""
        if log is not self.log:
            self.log = log
            self.drop_views()

    def drop_views(self) -> None:
        """Forget every view into guest memory (the table is about to change)."""
        self._gen = None
        self._desc = self._avail = self._used = self._used16 = memoryview(b"")

    def sync_from_used(self) -> int:
        """Adopt the used index the driver sees as the place to resume.

        This device completes every chain before it yields, so at a quiescent
        point the next chain to take is the used index. Front-ends disagree on
        what they send as the base after a reconnect (QEMU sends the used
        index, DPDK's virtio-user sends 0); the ring itself is the truth.
        """
        self.refresh()
        used: int = U16.unpack_from(self._used, 2)[0]
        self.last_used = self.last_avail = used
        self.signalled_valid = False
        return used

    # -- the driver's side -------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's avail index as it is now."""
        idx: int = U16.unpack_from(self._avail, 2)[0]
        return idx

    def available(self) -> int:
        """How many chains the driver has made available and we have not taken."""
        n: int = (U16.unpack_from(self._avail, 2)[0] - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(
                QueueFault.AVAIL_JUMP,
                f"avail index moved {n} past {self.last_avail} on a ring of {self.size}",
            )
        return n

    def has_available(self) -> bool:
        """``available() != 0`` (the packed ring answers this without counting)."""
        return self.available() != 0

    def head(self, nth: int = 0) -> int:
        """The head descriptor of the ``nth`` not-yet-taken available chain."""
        slot = (self.last_avail + nth) % self.size
        head: int = U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= self.size:
            raise QueueError(QueueFault.HEAD_RANGE, f"head {head} >= queue size {self.size}")
        return head

    def walk(self, head: int, writable: bool, out: list[memoryview]) -> int:
        """Translate the chain at ``head`` into views appended to ``out``.

        ``writable`` says which direction the device needs: every descriptor
        must be device-writable (RX) or device-readable (TX). Returns the
        chain's byte count. Raises IotlbMiss (nothing taken; retry later) or
        QueueError.
        """
        mem = self.mem
        perm = WRITE if writable else READ
        table = self._desc
        limit = self.size
        i = head
        seen = 0
        total = 0
        want = DESC_F_WRITE if writable else 0
        unpack = DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, 16 * i)
            if flags & DESC_F_INDIRECT:
                table, limit = self._indirect(table, addr, length, flags)
                i = seen = 0
                continue
            seen += 1
            if seen > limit:
                raise QueueError(QueueFault.LOOP, f"chain at head {head} exceeds {limit}")
            if flags & DESC_F_WRITE != want:
                raise QueueError(
                    QueueFault.DIRECTION,
                    f"head {head}: {'read-only' if writable else 'writable'} descriptor",
                )
            if length:
                total += length
                if total > self.max_chain_bytes:
                    raise QueueError(QueueFault.TOO_LONG, f"head {head}: over {total} bytes")
                try:
                    out.append(mem.buffer(addr, length, perm))
                except OutsideMemory:
                    try:
                        out.extend(mem.buffer_segments(addr, length, perm))
                    except OutsideMemory as exc:
                        raise QueueError(QueueFault.UNMAPPED, str(exc)) from None
            if not flags & DESC_F_NEXT:
                return total
            if nxt >= limit:
                raise QueueError(QueueFault.NEXT_RANGE, f"next {nxt} >= {limit}")
            i = nxt

    def _indirect(
        self, table: memoryview, addr: int, length: int, flags: int
    ) -> tuple[memoryview, int]:
        if not self.indirect:
            raise QueueError(QueueFault.INDIRECT_OFF, "indirect descriptor not negotiated")
        if table is not self._desc:
            raise QueueError(QueueFault.INDIRECT_NESTED, "indirect table inside another")
        if flags & DESC_F_NEXT:
            raise QueueError(QueueFault.INDIRECT_NEXT, "indirect descriptor with NEXT")
        if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
            raise QueueError(QueueFault.INDIRECT_LEN, f"indirect table of {length} bytes")
        try:
            return self.mem.buffer(addr, length, READ), length // 16
        except OutsideMemory as exc:
            raise QueueError(QueueFault.UNMAPPED, f"indirect table: {exc}") from None

    # -- the device's side -------------------------------------------------

    def put(self, head: int, written: int) -> None:
        """Return the chain at ``head`` as used, without publishing the index yet."""
        at = 4 + 8 * (self.last_used % self.size)
        USED_ELEM.pack_into(self._used, at, head, written)
        if self.log is not None:
            self.log.mark(self.log_used + at, 8)
        self.last_used = (self.last_used + 1) & 0xFFFF
        self.last_avail = (self.last_avail + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every ``put`` visible to the driver (x86 keeps stores in order).

        A no-op when the views are gone: nothing can have been put since.
        The index is stored through a 16-bit view, one store: ``pack_into``
        zeroes its target before writing, and a driver that reads the index
        in between sees it jump back (DPDK then frees chains it never got back).
        """
        if self._gen is not None:
            if self.log is not None:
                self.log.mark(self.log_used + 2, 2)
            self._used16[1] = self.last_used

    @property
    def published(self) -> bool:
        """Something was returned since the last interrupt decision."""
        return self.last_used != self.signalled_used or not self.signalled_valid

    def needs_interrupt(self) -> bool:
        """Whether the driver asked to hear about what was just published."""
        if self._gen is None:
            return False
        fence()
        new = self.last_used
        old, valid = self.signalled_used, self.signalled_valid
        self.signalled_used, self.signalled_valid = new, True
        if self.event_idx:
            if not valid:
                return True
            event: int = U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags: int = U16.unpack_from(self._avail, 0)[0]
        return not flags & AVAIL_F_NO_INTERRUPT

    def want_kicks(self, seen: int | None = None) -> bool:
        """Ask the driver to kick on new chains; True if some came meanwhile.

        ``seen``: the avail index at which the chains there were found too
        few (an RX frame needs more buffers): ask for a kick on the next
        chain after those, and report only chains posted since.
        """
        self.refresh()
        mark = self.last_avail if seen is None else seen
        if self.event_idx:
            self._used16[2 + 4 * self.size] = mark
            self._log_used_field(4 + 8 * self.size)
        else:
            self._used16[0] = 0
            self._log_used_field(0)
        fence()
        n = self.available()
        return n != 0 if seen is None else self.avail_idx() != seen

    def suppress_kicks(self) -> None:
        """While we are busy polling, kicks only cost the driver a syscall."""
        if not self.event_idx and self._gen == self.mem.generation:
            self._used16[0] = USED_F_NO_NOTIFY
            self._log_used_field(0)

    def _log_used_field(self, at: int) -> None:
        if self.log is not None:
            self.log.mark(self.log_used + at, 2)
