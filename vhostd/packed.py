"""The device side of a packed virtqueue (VIRTIO 1.1, 2.8).

A :class:`PackedQueue` has the interface of
:class:`~vhostd.virtqueue.SplitQueue` (``net.py`` and ``fastpath.py`` are
written once against :class:`~vhostd.vqueue.Virtqueue`), over one ring of
16-byte descriptors that the driver makes available and the device writes
back as used, plus two 4-byte event areas. What differs:

- A ring position is kept as vhost-user encodes it: bits 0-14 the index,
  bit 15 the wrap counter (``last_avail``/``last_used``; the vring base is
  ``last_avail | last_used << 16``). Wrap counters start at 1 and flip when
  the index passes the ring size, which need not be a power of 2.
- A "head" is the position of a chain's first descriptor. Walking a chain
  records its buffer id (from its last descriptor) and how many ring
  descriptors it took in ``ids``/``counts``, indexed by position; ``head(n)``
  hops over those counts, and ``put`` writes one used descriptor at the used
  position and moves both positions on by the chain's count. The C walker
  (``csrc/packed.c``) shares these two arrays, so either side may walk a
  chain the other returns.
- Every descriptor of a chain must be available in the wrap of its position
  (the driver flips the head last, after the rest); its flags are read first
  and the rest of it after, each descriptor once.

Chains complete in order, so the used position always equals the avail
position at rest: what ``sync_from_used`` relies on.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

from .guestmem import GuestMemory, OutsideMemory
from .memory import local_address
from .native import ffi, lib
from .virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    READ,
    WRITE,
    QueueError,
    QueueFault,
)

if TYPE_CHECKING:
    from .dirtylog import DirtyLog

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_LEN_ID = struct.Struct("<IH")
EVENT = struct.Struct("<HH")
"""An event area: off_wrap, flags."""

DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
WRAP = 1 << 15
"""The wrap counter's bit in an encoded position (and in ``off_wrap``)."""
START = WRAP
"""Where a fresh ring starts: index 0, wrap counter 1."""
EVENT_BYTES = 4

fence = lib.vhostd_fence
log = logging.getLogger(__name__)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor ring, driver event area and device event area."""
    return 16 * size, EVENT_BYTES, EVENT_BYTES


def valid_size(size: int) -> bool:
    """Packed rings may have any size up to 32768 (no power of 2 needed)."""
    return 0 < size <= MAX_QUEUE_SIZE


def advance(pos: int, n: int, size: int) -> int:
    """The encoded position ``n`` (<= size) descriptors after ``pos``."""
    idx = (pos & 0x7FFF) + n
    wrap = pos & WRAP
    if idx >= size:
        idx -= size
        wrap ^= WRAP
    return idx | wrap


def is_avail(flags: int, pos: int) -> bool:
    """Whether a descriptor at ``pos`` with ``flags`` is available to the device."""
    wrap = bool(pos & WRAP)
    return bool(flags & DESC_F_AVAIL) == wrap and bool(flags & DESC_F_USED) != wrap


def linear(pos: int, size: int) -> int:
    """A position on the circle of 2 * size (index, plus size on odd laps)."""
    return (pos & 0x7FFF) + (0 if pos & WRAP else size)


def base_halves(base: int) -> tuple[int, int]:
    """SET_VRING_BASE's value as (avail, used) positions.

    QEMU sends both halves; DPDK's virtio-user sends only the avail half
    (0x8000 for a fresh ring): a used half of 0 then means "where avail is".
    """
    avail = base & 0xFFFF
    used = (base >> 16) & 0xFFFF
    return avail, used or avail


class PackedQueue:
    """One started packed ring: its addresses, positions and cached views."""

    __slots__ = (
        "_avail",
        "_cursor",
        "_desc",
        "_desc16",
        "_end",
        "_gen",
        "_used",
        "_used16",
        "avail_addr",
        "counts",
        "desc_addr",
        "event_idx",
        "first_avail",
        "ids",
        "index",
        "indirect",
        "last_avail",
        "last_used",
        "log",
        "log_event",
        "log_used",
        "max_chain_bytes",
        "mem",
        "signalled_used",
        "signalled_valid",
        "size",
        "used_addr",
    )

    packed = True

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
        """The driver event area (vhost-user's ``avail`` address)."""
        self.used_addr = used_addr
        """The device event area (vhost-user's ``used`` address)."""
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain_bytes = max_chain_bytes
        avail, used = base_halves(base)
        self.last_avail = self.first_avail = self._clamp(avail)
        self.last_used = self._clamp(used)
        self.signalled_used = 0
        self.signalled_valid = False
        self.ids: Any = ffi.new("uint16_t[]", size)
        """Buffer id of the chain walked at each position (shared with C)."""
        self.counts: Any = ffi.new("uint16_t[]", size)
        """Ring descriptors of the chain walked at each position (shared with C)."""
        self._cursor = (-1, 0, 0)
        self._end = (-1, 0, 0)
        """(position, last_avail then, descriptors between): where avail_idx stopped."""
        """(last_avail it was for, nth chain, its position): head(n) goes on from there."""
        self.log: DirtyLog | None = None
        self.log_used = 0
        """The descriptor ring's guest-physical address: used descriptors land there."""
        self.log_event = 0
        """The device event area's guest-physical address."""
        self._gen: tuple[int, int, int] | None = None
        self._desc = self._avail = self._used = self._used16 = self._desc16 = memoryview(b"")

    def _clamp(self, pos: int) -> int:
        # An index past the ring cannot be resumed from: start the lap over.
        return pos if (pos & 0x7FFF) < self.size else pos & WRAP

    @property
    def base(self) -> int:
        """What GET_VRING_BASE reports: both positions with their wrap counters."""
        return self.last_avail | self.last_used << 16

    # -- rings -------------------------------------------------------------

    def refresh(self) -> None:
        """Translate the ring and event areas again if anything may have moved.

        The descriptor ring is read and written (used descriptors go back into
        it), the driver area only read, the device area only written.
        """
        gen = self.mem.generation
        if gen == self._gen:
            return
        self.drop_views()
        dsize, esize, _ = ring_sizes(self.size)
        try:
            desc = self.mem.ring(self.desc_addr, dsize, READ | WRITE)
            avail = self.mem.ring(self.avail_addr, esize, READ)
            used = self.mem.ring(self.used_addr, esize, WRITE)
        except OutsideMemory as exc:
            raise QueueError(QueueFault.RING_UNMAPPED, str(exc)) from None
        for name, addr, view, align in (
            ("descriptor ring", self.desc_addr, desc, 16),
            ("driver event area", self.avail_addr, avail, 4),
            ("device event area", self.used_addr, used, 4),
        ):
            if addr % align or local_address(view) % align:
                raise QueueError(
                    QueueFault.RING_MISALIGNED,
                    f"{name} at {addr:#x} is not {align}-byte aligned",
                )
        if self.log is not None:
            self.log_used = self.mem.gpa_of(desc)
            self.log_event = self.mem.gpa_of(used)
        self._desc, self._avail, self._used = desc, avail, used
        self._desc16 = desc.cast("H")
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
        self._desc = self._avail = self._used = self._used16 = self._desc16 = memoryview(b"")

    def sync_from_used(self) -> int:
        """Resume at the used position: chains between it and avail were never returned.

        A base the ring has already passed is replaced by where the ring
        stands (:meth:`resume_point`): QEMU 7.2 does not read a packed ring's
        position back when its back-end goes away, so after a restart of
        vhostd it sends the base it last knew, often the very first one.
        """
        self.refresh()
        if self._passed(self.last_used):
            found = self.resume_point()
            log.warning(
                "vring %d: packed base %#x was already passed; resuming at %#x, where the ring is",
                self.index,
                self.last_used,
                found,
            )
            self.last_used = found
        self.last_avail = self.first_avail = self.last_used
        self.signalled_valid = False
        return self.last_used

    def _passed(self, pos: int) -> bool:
        """The ring is already past ``pos``: its USED bit says so (see resume_point).

        Where the device stands, the descriptor is one the driver made
        available in this lap, or what the lap before left: USED is the
        inverse of the wrap counter. The device's own used descriptor of this
        lap, or the driver's repost of it for the next, has USED equal to it.
        """
        return bool(self._flags(pos) & DESC_F_USED) == bool(pos & WRAP)

    def resume_point(self) -> int:
        """Where the device stands, read from the ring alone.

        The device writes used descriptors in order and sets their USED bit to
        the lap's wrap counter; a driver reposting one writes USED as the
        inverse of the new lap's counter, which is the same value. So, chain by
        chain, USED equals the current wrap counter up to the device's position
        and the previous one after it. Exact for rings of one-descriptor
        chains (Linux posts indirect tables, or pushes the header); what a
        driver made of longer chains can only be guessed.
        """
        size = self.size
        first = bool(self._flags(0) & DESC_F_USED)
        for idx in range(1, size):
            if bool(self._flags(idx) & DESC_F_USED) != first:
                return idx | (WRAP if first else 0)
        return 0 if first else WRAP

    # -- the driver's side -------------------------------------------------

    def _flags(self, pos: int) -> int:
        flags: int = self._desc16[8 * (pos & 0x7FFF) + 7]
        return flags

    def _scan(self, pos: int | None = None, seen: int = 0) -> tuple[int, int, int]:
        """(chains available, the position after them, descriptors up to there).

        From last_avail, or from ``pos`` with ``seen`` descriptors already
        counted before it. Reads flags only, following NEXT; the walk reads
        every descriptor again and is what counts. A chain that runs past the
        ring ends the scan counted (its walk faults).
        """
        size = self.size
        if pos is None:
            pos = self.last_avail
        n = 0
        while seen < size:
            flags = self._flags(pos)
            if not is_avail(flags, pos):
                break
            n += 1
            while flags & DESC_F_NEXT and not flags & DESC_F_INDIRECT:
                seen += 1
                if seen >= size:
                    return n, pos, seen
                pos = advance(pos, 1, size)
                flags = self._flags(pos)
            seen += 1
            pos = advance(pos, 1, size)
        return n, pos, seen

    def chain_starts(self, limit: int) -> list[int]:
        """Positions of up to ``limit`` available chains, from their flags alone.

        For the IOTLB look-ahead, which must find chains past one it cannot
        translate (``head`` knows a chain's end only once it was walked).
        """
        size = self.size
        pos = self.last_avail
        out: list[int] = []
        seen = 0
        while seen < size and len(out) < limit:
            flags = self._flags(pos)
            if not is_avail(flags, pos):
                break
            out.append(pos)
            while flags & DESC_F_NEXT and not flags & DESC_F_INDIRECT and seen + 1 < size:
                seen += 1
                pos = advance(pos, 1, size)
                flags = self._flags(pos)
            seen += 1
            pos = advance(pos, 1, size)
        return out

    def avail_idx(self) -> int:
        """The position after the chains available now (what a stalled RX ring waits past).

        Goes on from where the last call stopped, less what was taken since:
        what a driver made available stays so until the device uses it, so a
        backlog flushed frame by frame does not rescan the ring per frame.
        """
        end, base, gap = self._end
        size = self.size
        taken = (linear(self.last_avail, size) - linear(base, size)) % (2 * size)
        if end < 0 or taken > gap:
            _, after, seen = self._scan()
        else:
            _, after, seen = self._scan(end, gap - taken)
        self._end = (after, self.last_avail, seen)
        return after

    def available(self) -> int:
        """How many chains the driver has made available and we have not taken.

        A Python scan over every one of them: callers that only ask whether
        there are any use :meth:`has_available`.
        """
        return self._scan()[0]

    def has_available(self) -> bool:
        """Whether a chain is available: ``available() != 0`` from one descriptor's flags.

        The scan counts a chain exactly when the descriptor at ``last_avail``
        is available in its wrap, so that one read decides (the polls and
        ``want_kicks`` run this per round; a full scan cost a Python loop per
        chain the driver posted).
        """
        pos = self.last_avail
        return is_avail(self._desc16[8 * (pos & 0x7FFF) + 7], pos)

    def head(self, nth: int = 0) -> int:
        """The position of the ``nth`` not-yet-taken chain (the ones before it walked)."""
        base, k, pos = self._cursor
        if base != self.last_avail or k > nth:
            k, pos = 0, self.last_avail
        counts, size = self.counts, self.size
        while k < nth:
            pos = advance(pos, counts[pos & 0x7FFF] % (size + 1), size)
            k += 1
        self._cursor = (self.last_avail, k, pos)
        return pos

    def walk(self, head: int, writable: bool, out: list[memoryview]) -> int:
        """Translate the chain at position ``head`` into views appended to ``out``.

        As :meth:`SplitQueue.walk`; also records the chain's buffer id and
        descriptor count for ``put``.
        """
        mem = self.mem
        perm = WRITE if writable else READ
        want = DESC_F_WRITE if writable else 0
        size = self.size
        ring = self._desc
        unpack = DESC.unpack_from
        pos = head
        ndesc = 0
        total = 0
        while True:
            if ndesc >= size:
                raise QueueError(QueueFault.LOOP, f"chain at head {head} exceeds {size}")
            at = 16 * (pos & 0x7FFF)
            flags = self._desc16[(at >> 1) + 7]  # flags first; the rest after (acquire)
            if not is_avail(flags, pos):
                raise QueueError(
                    QueueFault.WRAP,
                    f"chain at {head}: descriptor {pos & 0x7FFF} not available "
                    f"in wrap {pos >> 15} (flags {flags:#x})",
                )
            addr, length, buf_id, _ = unpack(ring, at)
            ndesc += 1
            if flags & DESC_F_INDIRECT:
                total = self._indirect(head, addr, length, flags, want, perm, total, out)
            else:
                if flags & DESC_F_WRITE != want:
                    raise QueueError(
                        QueueFault.DIRECTION,
                        f"head {head}: {'read-only' if writable else 'writable'} descriptor",
                    )
                total = self._add(head, mem, addr, length, perm, total, out)
            if flags & DESC_F_INDIRECT or not flags & DESC_F_NEXT:
                break
            pos = advance(pos, 1, size)
        if buf_id >= size:
            raise QueueError(QueueFault.ID_RANGE, f"buffer id {buf_id} >= queue size {size}")
        slot = head & 0x7FFF
        self.ids[slot] = buf_id
        self.counts[slot] = ndesc
        return total

    def _add(
        self,
        head: int,
        mem: GuestMemory,
        addr: int,
        length: int,
        perm: Any,
        total: int,
        out: list[memoryview],
    ) -> int:
        if not length:
            return total
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
        return total

    def _indirect(
        self,
        head: int,
        addr: int,
        length: int,
        flags: int,
        want: int,
        perm: Any,
        total: int,
        out: list[memoryview],
    ) -> int:
        """Walk an indirect table: len/16 descriptors in order, NEXT ignored."""
        if not self.indirect:
            raise QueueError(QueueFault.INDIRECT_OFF, "indirect descriptor not negotiated")
        if flags & DESC_F_NEXT:
            raise QueueError(QueueFault.INDIRECT_NEXT, "indirect descriptor with NEXT")
        if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
            raise QueueError(QueueFault.INDIRECT_LEN, f"indirect table of {length} bytes")
        try:
            table = self.mem.buffer(addr, length, READ)
        except OutsideMemory as exc:
            raise QueueError(QueueFault.UNMAPPED, f"indirect table: {exc}") from None
        mem = self.mem
        unpack = DESC.unpack_from
        for i in range(length // 16):
            a, n, _, f = unpack(table, 16 * i)
            if f & DESC_F_INDIRECT:
                raise QueueError(QueueFault.INDIRECT_NESTED, "indirect table inside another")
            if f & DESC_F_WRITE != want:
                raise QueueError(
                    QueueFault.DIRECTION,
                    f"head {head}: {'read-only' if want else 'writable'} descriptor",
                )
            total = self._add(head, mem, a, n, perm, total, out)
        return total

    # -- the device's side -------------------------------------------------

    def put(self, head: int, written: int) -> None:
        """Write the used descriptor for the chain at ``head`` and move past it.

        id and len first, then the flags in one 16-bit store (x86 keeps
        stores in order), so the driver never sees a used descriptor half
        written.
        """
        size = self.size
        slot = head & 0x7FFF
        at = self.last_used & 0x7FFF
        flags = (DESC_F_AVAIL | DESC_F_USED) if self.last_used & WRAP else 0
        if written:
            flags |= DESC_F_WRITE
        USED_LEN_ID.pack_into(self._desc, 16 * at + 8, written, self.ids[slot])
        self._desc16[8 * at + 7] = flags
        if self.log is not None:
            self.log.mark(self.log_used + 16 * at + 8, 8)
        count = self.counts[slot] % (size + 1) or 1
        self.last_used = advance(self.last_used, count, size)
        self.last_avail = advance(self.last_avail, count, size)

    def publish(self) -> None:
        """Nothing to do: every ``put`` is visible once its flags are stored."""

    @property
    def published(self) -> bool:
        """Something was returned since the last interrupt decision."""
        return self.last_used != self.signalled_used or not self.signalled_valid

    def needs_interrupt(self) -> bool:
        """Whether the driver event area asks to hear about what was just put."""
        if self._gen is None:
            return False
        fence()
        new = self.last_used
        old, valid = self.signalled_used, self.signalled_valid
        self.signalled_used, self.signalled_valid = new, True
        off_wrap, flags = EVENT.unpack_from(self._avail, 0)
        if flags == EVENT_DISABLE:
            return False
        if flags != EVENT_DESC or not self.event_idx or not valid:
            return True
        size = self.size
        size2 = 2 * size
        lnew, lold, event = linear(new, size), linear(old, size), linear(off_wrap, size)
        return (lnew - event - 1) % size2 < (lnew - lold) % size2

    def want_kicks(self, seen: int | None = None) -> bool:
        """Ask the driver to kick on new chains; True if some came meanwhile.

        With EVENT_IDX, a kick only for a chain made available at the mark
        (``seen``, or the next position to take); otherwise for any.
        """
        self.refresh()
        mark = self.last_avail if seen is None else seen
        if self.event_idx:
            self._used16[0] = mark
            self._used16[1] = EVENT_DESC
        else:
            self._used16[1] = EVENT_ENABLE
        self._log_event()
        fence()
        if seen is None:
            return self.has_available()
        return self._scan()[1] != seen

    def suppress_kicks(self) -> None:
        """While we are busy polling, kicks only cost the driver a syscall."""
        if not self.event_idx and self._gen == self.mem.generation:
            self._used16[1] = EVENT_DISABLE
            self._log_event()

    def _log_event(self) -> None:
        if self.log is not None:
            self.log.mark(self.log_event, EVENT_BYTES)
