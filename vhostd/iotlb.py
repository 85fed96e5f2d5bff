"""The device IOTLB: IOVA ranges -> front-end user addresses, with a permission.

With ACCESS_PLATFORM every address the guest hands us (ring addresses, descriptor
buffers) is an IOVA. The front-end feeds this cache with UPDATE/INVALIDATE messages
and answers our MISS messages; this module only holds the map. It does no I/O.

Layout: two parallel sorted Python lists, ``_starts`` (the keys) and ``_entries``
(``(start, end, uaddr, perm)`` tuples), searched with the C ``bisect`` module.
Entries never overlap, so the entry that may contain an address is the last one
whose start is <= that address: one ``bisect_right``, O(log n). Compared with
``sortedcontainers.SortedList`` a lookup is 4-6x cheaper (its positional index is
walked in Python), at the price of O(n) memmove on insert/delete, about 20 us at
65,536 entries. Mutations come one per vhost-user message, which costs more than
that to receive and ack; lookups come once per descriptor. The lookup is what
DPDK got wrong (a linear scan), so the lookup is what this layout optimises.

On top of that, ``translate`` first checks the entry that served the previous
successful lookup: descriptors of one packet and consecutive ring accesses
mostly fall in the same page.

Eviction is least recently used first, kept in an ``OrderedDict`` keyed by entry
start: O(1) per touch and per eviction. (A plain dict used as a queue degrades:
popping its first key leaves dummies that every later ``next(iter(d))`` rescans.)
A lookup served by the page cache, the bisect, ``_walk`` or ``entry_at`` moves its
entry to the recent end. A hit on ``_last`` records nothing, so the hottest path
costs what it did; an ``update`` about to evict first moves ``_last`` to the recent
end, which ranks the entry the last lookups used as the most recent one too. The
C burst loops translate from a per-queue cache that ``GuestMemory.extent`` fills
through ``entry_at``, and their hits never come back here. But that cache is
cleared whenever `generation` changes and every eviction bumps it, so each entry
the C path still uses is re-filled, i.e. touched, after every eviction (when its
queue next runs), which ranks it ahead of every entry nobody has used since.

Over capacity, `_evict` drops ``capacity // 16`` entries at once (at least one), not
one: each eviction bumps `generation` and so empties every C cache, and a flood of
UPDATEs at capacity must not do that on every message. An evicted entry costs one
more MISS round trip if it is used again, never a wrong translation.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.enums import IotlbPerm

__all__ = [
    "IoTlb",
    "IotlbDenied",
    "IotlbDiscontiguous",
    "IotlbError",
    "IotlbMiss",
    "IotlbStats",
    "PendingMisses",
]

ADDRESS_LIMIT = 1 << 64
"""One past the last IOVA. A range may end exactly here (QEMU's flush-all does)."""

DEFAULT_CAPACITY = 4096
"""Entries per IOTLB unless the port says otherwise (``iotlb_entries``).

Linux vhost (``max_iotlb_entries``) and DPDK both cap at 2048. A port at its
defaults (4 queue pairs of 256 descriptors, QEMU's ring size) can have 2048
buffers posted at once, each on its own page when the guest maps per buffer, plus
the rings: 2048 would make a busy guest evict its own live buffers. 4096 holds that
working set with room for the stale mappings a lazy-mode guest leaves until its
next flush, for about 1.3 MiB per port (some 320 bytes an entry). Ports with more
queue pairs or longer rings should raise ``iotlb_entries``.
"""

# _GRANTS[have][need]: does an entry with permission `have` allow access `need`?
# A table lookup keeps IntFlag's Python-level `&` off the hot path.
_GRANTS: tuple[tuple[bool, ...], ...] = tuple(
    tuple(need & ~have == 0 for need in range(4)) for have in range(4)
)

# (start, end, uaddr, perm) with end exclusive and perm a plain int 1..3.
_Entry = tuple[int, int, int, int]

PAGE_SHIFT = 12
PAGE_CACHE_SIZE = 4096
"""Pages remembered in front of the bisect; past that the cache starts over."""

# Cached "last hit" that no address can match (start > end).
_NO_ENTRY: _Entry = (1, 0, 0, 0)


class IotlbError(Exception):
    """Base of the translation failures."""

    iova: int
    """Where in the asked range the problem starts."""


class IotlbMiss(IotlbError):
    """Some byte of the range has no entry: ask the front-end (send MISS) and retry."""

    def __init__(self, iova: int, perm: IotlbPerm) -> None:
        super().__init__(f"IOTLB miss at iova {iova:#x} ({perm!r})")
        self.iova = iova
        """First byte of the range that no entry covers."""
        self.perm = perm

    def page(self, page_size: int = 4096) -> int:
        """The missing IOVA aligned down to `page_size` (what QEMU will answer for)."""
        return self.iova & ~(page_size - 1)


class IotlbDenied(IotlbError):
    """The range is mapped but without the access asked for (e.g. RX into a read-only buffer)."""

    def __init__(self, iova: int, need: IotlbPerm, have: IotlbPerm) -> None:
        super().__init__(f"IOTLB denied at iova {iova:#x}: need {need!r}, mapped {have!r}")
        self.iova = iova
        """First byte of the range whose entry lacks `need`."""
        self.need = need
        self.have = have


class IotlbDiscontiguous(IotlbError):
    """The whole range is mapped and allowed, but not to one contiguous user range.

    Not a miss: the caller should use `segments` (same as `IoTlb.translate_segments`).
    """

    def __init__(self, iova: int, size: int, segments: list[tuple[int, int]]) -> None:
        super().__init__(f"IOTLB range {iova:#x}+{size:#x} maps to {len(segments)} pieces")
        self.iova = iova
        self.size = size
        self.segments = segments
        """``(uaddr, length)`` pieces in IOVA order."""


@dataclass(slots=True)
class IotlbStats:
    """Plain counters; the metrics layer reads them, nothing here resets them."""

    lookups: int = 0
    """translate/translate_segments calls with a valid range."""
    hits: int = 0
    """Lookups that returned a translation."""
    misses: int = 0
    updates: int = 0
    invalidations: int = 0
    """invalidate calls (touching something or not) plus flushes."""
    evictions: int = 0
    denied: int = 0


def _check_range(iova: int, size: int) -> int:
    if iova < 0 or size <= 0:
        raise ValueError(f"bad IOTLB range iova={iova:#x} size={size:#x}")
    end = iova + size
    if end > ADDRESS_LIMIT:
        raise ValueError(f"IOTLB range {iova:#x}+{size:#x} ends beyond 2**64")
    return end


@dataclass(slots=True, eq=False)
class IoTlb:
    """Non-overlapping IOVA ranges, each mapped to a user address with a permission.

    `generation` increases whenever a translation may have been removed or changed
    (invalidate or update that touched an entry, flush, eviction). A caller may
    keep a translation it got while `generation` stays the same. Adding a mapping
    where there was none does not bump it, so do not cache misses on it.

    At most `capacity` entries are kept; past it the least recently used go,
    a sixteenth of the table at a time (see the module's docstring).
    """

    capacity: int = DEFAULT_CAPACITY
    stats: IotlbStats = field(default_factory=IotlbStats)
    generation: int = 0
    _starts: list[int] = field(default_factory=list, repr=False)
    _entries: list[_Entry] = field(default_factory=list, repr=False)
    _order: OrderedDict[int, None] = field(default_factory=OrderedDict, repr=False)
    _last: _Entry = field(default=_NO_ENTRY, repr=False)
    # Page number -> the entry that served it: hot pages skip the bisect, so a lookup
    # costs the same with 16 or 65,536 live entries. Reset with _last.
    _pages: dict[int, _Entry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"IOTLB capacity must be >= 1, got {self.capacity}")

    def __len__(self) -> int:
        return len(self._starts)

    def entries(self) -> list[tuple[int, int, int, IotlbPerm]]:
        """``(iova, size, uaddr, perm)`` for every entry, sorted by iova (for tests, dumps)."""
        return [(s, e - s, u, IotlbPerm(p)) for s, e, u, p in self._entries]

    # -- lookups -------------------------------------------------------------

    def entry_at(self, iova: int) -> tuple[int, int, int, int] | None:
        """``(start, end, uaddr, perm)`` of the entry holding `iova`, or None.

        Counts nothing: callers that translate with it (``GuestMemory.extent``)
        keep the statistics themselves. It does mark the entry used, for LRU.
        """
        i = bisect_right(self._starts, iova) - 1
        if i >= 0:
            entry = self._entries[i]
            if iova < entry[1]:
                self._order.move_to_end(entry[0])
                return entry
        return None

    def translate(self, iova: int, size: int, perm: IotlbPerm) -> int:
        """Return the user address of `iova` if all of ``[iova, iova+size)`` is usable.

        Usable means covered by entries that grant `perm` and whose user addresses
        continue each other. Raises IotlbMiss (send MISS for `.iova`), IotlbDenied,
        IotlbDiscontiguous (use its `.segments`), or ValueError for size <= 0 or a
        range past 2**64 (a caller bug or a bogus descriptor, never a miss).
        """
        end = iova + size
        start, stop, uaddr, have = self._last
        if start <= iova < end <= stop and _GRANTS[have][perm]:
            stats = self.stats
            stats.lookups += 1
            stats.hits += 1
            return uaddr + (iova - start)
        pages = self._pages
        entry = pages.get(iova >> PAGE_SHIFT, _NO_ENTRY)
        start, stop, uaddr, have = entry
        if start <= iova < end <= stop and _GRANTS[have][perm]:
            stats = self.stats
            stats.lookups += 1
            stats.hits += 1
            self._last = entry
            self._order.move_to_end(start)
            return uaddr + (iova - start)
        # One bisect: the only entry that can hold iova is the last starting at or below it.
        i = bisect_right(self._starts, iova) - 1
        if i >= 0:
            entry = self._entries[i]
            start, stop, uaddr, have = entry
            if iova < end <= stop and _GRANTS[have][perm]:
                stats = self.stats
                stats.lookups += 1
                stats.hits += 1
                self._last = entry
                self._order.move_to_end(start)
                if len(pages) >= PAGE_CACHE_SIZE:
                    pages.clear()
                pages[iova >> PAGE_SHIFT] = entry
                return uaddr + (iova - start)
        # Rare: several entries, a miss, a denial, or a bad range.
        segments = self._walk(iova, size, perm)
        if len(segments) == 1:
            return segments[0][0]
        raise IotlbDiscontiguous(iova, size, segments)

    def translate_segments(self, iova: int, size: int, perm: IotlbPerm) -> list[tuple[int, int]]:
        """Like translate, but return ``(uaddr, length)`` pieces instead of one address.

        Adjacent entries with continuing user addresses are merged into one piece.
        """
        return self._walk(iova, size, perm)

    def _walk(self, iova: int, size: int, perm: IotlbPerm) -> list[tuple[int, int]]:
        end = _check_range(iova, size)
        stats = self.stats
        stats.lookups += 1
        starts = self._starts
        entries = self._entries
        i = bisect_right(starts, iova) - 1
        if i < 0 or entries[i][1] <= iova:
            stats.misses += 1
            raise IotlbMiss(iova, IotlbPerm(perm))
        first = entries[i]
        segments: list[tuple[int, int]] = []
        pos = iova
        count = len(starts)
        touch = self._order.move_to_end
        while True:
            start, stop, uaddr, have = entries[i]
            if not _GRANTS[have][perm]:
                stats.denied += 1
                raise IotlbDenied(pos, IotlbPerm(perm), IotlbPerm(have))
            touch(start)
            piece_uaddr = uaddr + (pos - start)
            piece_end = end if end < stop else stop
            if segments and segments[-1][0] + segments[-1][1] == piece_uaddr:
                segments[-1] = (segments[-1][0], segments[-1][1] + piece_end - pos)
            else:
                segments.append((piece_uaddr, piece_end - pos))
            if end <= stop:
                break
            pos = stop
            i += 1
            if i == count or starts[i] != pos:
                stats.misses += 1
                raise IotlbMiss(pos, IotlbPerm(perm))
        stats.hits += 1
        self._last = first
        return segments

    # -- mutations -----------------------------------------------------------

    def update(self, iova: int, size: int, uaddr: int, perm: IotlbPerm) -> None:
        """Map ``[iova, iova+size)`` to `uaddr` with `perm`, replacing any overlapped part.

        Applying the same UPDATE twice leaves the same map. Raises ValueError for
        size <= 0, a range (IOVA or user) past 2**64, or a perm outside READ..RW.
        """
        end = _check_range(iova, size)
        if uaddr < 0 or uaddr + size > ADDRESS_LIMIT:
            raise ValueError(f"IOTLB uaddr range {uaddr:#x}+{size:#x} out of bounds")
        have = int(perm)
        if not 1 <= have <= 3:
            raise ValueError(f"bad IOTLB permission {perm!r}")
        self.stats.updates += 1
        entry = (iova, end, uaddr, have)
        starts = self._starts
        i = bisect_left(starts, iova)
        if i < len(starts) and self._entries[i] == entry:
            # Exact duplicate (e.g. a MISS answered twice): only its recency changes.
            self._order.move_to_end(iova)
            return
        if self._carve(iova, end):
            self.generation += 1
            i = bisect_left(starts, iova)
        order = self._order
        last = self._last
        if last is not _NO_ENTRY and len(starts) >= self.capacity:
            # About to evict. Hits on the last-hit fast path are not recorded: count
            # them now, before the new entry becomes the most recent.
            order.move_to_end(last[0])
        starts.insert(i, iova)
        self._entries.insert(i, entry)
        order[iova] = None
        if len(starts) > self.capacity:
            self._evict()

    def invalidate(self, iova: int, size: int) -> int:
        """Unmap ``[iova, iova+size)``; return how many entries were removed or trimmed.

        The end may be exactly 2**64 (lazy-mode flush-all); beyond raises ValueError.
        """
        end = _check_range(iova, size)
        self.stats.invalidations += 1
        touched = self._carve(iova, end)
        if touched:
            self.generation += 1
            if len(self._starts) > self.capacity:  # a split added one entry
                self._evict()
        return touched

    def flush(self) -> None:
        """Drop every entry."""
        self.stats.invalidations += 1
        self._starts.clear()
        self._entries.clear()
        self._order.clear()
        self._last = _NO_ENTRY
        self._pages.clear()
        self.generation += 1

    def _carve(self, lo: int, hi: int) -> int:
        """Remove ``[lo, hi)`` from every entry overlapping it; return entries touched."""
        starts = self._starts
        entries = self._entries
        i = bisect_right(starts, lo) - 1
        if i < 0 or entries[i][1] <= lo:
            i += 1
        j = bisect_left(starts, hi)
        if i >= j:
            return 0
        order = self._order
        kept: list[_Entry] = []
        first_start, _, first_uaddr, first_perm = entries[i]
        if first_start < lo:
            # Left remainder keeps its key, hence its recency; a right one is new.
            kept.append((first_start, lo, first_uaddr, first_perm))
        else:
            del order[first_start]
        for start, *_ in entries[i + 1 : j]:
            del order[start]
        last_start, last_end, last_uaddr, last_perm = entries[j - 1]
        if last_end > hi:
            kept.append((hi, last_end, last_uaddr + (hi - last_start), last_perm))
            order[hi] = None
        starts[i:j] = [entry[0] for entry in kept]
        entries[i:j] = kept
        self._last = _NO_ENTRY
        self._pages.clear()
        return j - i

    def _evict(self) -> None:
        """Drop least recently used entries down to ``capacity - capacity // 16``.

        Called when over capacity, so at least one goes; the entry just added is
        the most recent and never goes (the target is at least 1). Invalidations
        and replacing updates clear ``_last``, so only a plain insert (`update`)
        has a ``_last`` to rank first.
        """
        order = self._order
        victims = len(order) - (self.capacity - self.capacity // 16)
        starts = self._starts
        entries = self._entries
        # Keep the runs between victims with slice copies (C memcpy): one pass over
        # the lists however many go, instead of one memmove per victim.
        gone = sorted(bisect_left(starts, order.popitem(last=False)[0]) for _ in range(victims))
        kept_starts: list[int] = []
        kept_entries: list[_Entry] = []
        begin = 0
        for i in gone:
            kept_starts += starts[begin:i]
            kept_entries += entries[begin:i]
            begin = i + 1
        kept_starts += starts[begin:]
        kept_entries += entries[begin:]
        self._starts = kept_starts
        self._entries = kept_entries
        self.stats.evictions += victims
        self._last = _NO_ENTRY
        self._pages.clear()
        self.generation += 1


@dataclass(slots=True)
class PendingMisses:
    """The MISS messages sent and not yet answered, so one page is asked for once.

    The front-end answers a MISS with an UPDATE for the whole page, or with
    nothing at all if the guest has not mapped it; the caller bounds its wait
    from `sent_at` and then `forget`s the page.
    """

    page_size: int = 4096
    _sent: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)
    # Pages asked for ahead of need; nobody waits on them until a queue gets there.
    _ahead: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self._sent)

    def _key(self, iova: int, perm: IotlbPerm) -> tuple[int, int]:
        return (iova & ~(self.page_size - 1), int(perm))

    def __contains__(self, key: object) -> bool:
        """``(iova, perm) in pending``: is a MISS for that page and perm outstanding?"""
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        return self._key(*key) in self._sent

    def sent_at(self, iova: int, perm: IotlbPerm) -> float | None:
        """When the outstanding MISS for this page and perm went out, if one did."""
        return self._sent.get(self._key(iova, perm))

    def add(self, iova: int, perm: IotlbPerm, now: float, ahead: bool = False) -> bool:
        """Record a miss at `iova`; True if the caller should send MISS (not already pending).

        ``ahead``: asked for before any queue needed it (a look-ahead).
        """
        key = self._key(iova, perm)
        if key in self._sent:
            return False
        self._sent[key] = now
        if ahead:
            self._ahead.add(key)
        return True

    def ahead(self, iova: int, perm: IotlbPerm) -> bool:
        """Whether the outstanding MISS for this page was a look-ahead's."""
        return self._key(iova, perm) in self._ahead

    def expire(self, before: float) -> int:
        """Forget the look-ahead misses sent before ``before``; returns how many.

        A queue that needed a page bounds its own wait; one asked for ahead
        has nobody waiting, so nothing else would ever drop it.
        """
        old = [key for key in self._ahead if self._sent[key] < before]
        for key in old:
            del self._sent[key]
            self._ahead.discard(key)
        return len(old)

    def forget(self, iova: int, perm: IotlbPerm) -> None:
        """Give up on a MISS (unanswered, or never sent)."""
        key = self._key(iova, perm)
        self._sent.pop(key, None)
        self._ahead.discard(key)

    def resolve(self, iova: int, size: int) -> list[float]:
        """Forget the misses on pages overlapping ``[iova, iova+size)`` (an UPDATE came).

        Returns when each of them was sent, for the miss service time.
        """
        end = iova + size
        page_size = self.page_size
        done = [key for key in self._sent if key[0] < end and key[0] + page_size > iova]
        self._ahead.difference_update(done)
        return [self._sent.pop(key) for key in done]

    def clear(self) -> None:
        self._sent.clear()
        self._ahead.clear()
