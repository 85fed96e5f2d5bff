"""What the net device and the ring task need of a virtqueue, whatever its layout.

:class:`~vhostd.virtqueue.SplitQueue` and :class:`~vhostd.packed.PackedQueue`
both satisfy :class:`Virtqueue`; ``net.py``, ``fastpath.py`` and ``rings.py``
are written once against it, and :func:`make_queue` picks the layout the
driver negotiated (RING_PACKED).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .packed import PackedQueue
from .virtqueue import SplitQueue

if TYPE_CHECKING:
    from .dirtylog import DirtyLog
    from .guestmem import GuestMemory


class Virtqueue(Protocol):
    """One started ring as the data path sees it.

    ``last_avail``/``last_used`` are opaque positions the C core copies in
    and out (16 bits each: an index, or for packed rings an index and a wrap
    counter); ``head(n)`` returns a handle that ``walk`` and ``put`` take.
    """

    packed: bool
    index: int
    size: int
    mem: GuestMemory
    event_idx: bool
    indirect: bool
    max_chain_bytes: int
    last_avail: int
    first_avail: int
    """Where the ring was started (packed: a position; diagnosis compares against it)."""
    last_used: int
    log: DirtyLog | None
    log_used: int
    _gen: tuple[int, int, int] | None
    _desc: memoryview
    _avail: memoryview
    _used: memoryview

    @property
    def base(self) -> int: ...
    @property
    def published(self) -> bool: ...
    def refresh(self) -> None: ...
    def set_log(self, log: DirtyLog | None) -> None: ...
    def drop_views(self) -> None: ...
    def sync_from_used(self) -> int: ...
    def avail_idx(self) -> int: ...
    def available(self) -> int: ...
    def has_available(self) -> bool: ...
    def head(self, nth: int = 0) -> int: ...
    def walk(self, head: int, writable: bool, out: list[memoryview]) -> int: ...
    def put(self, head: int, written: int) -> None: ...
    def publish(self) -> None: ...
    def needs_interrupt(self) -> bool: ...
    def want_kicks(self, seen: int | None = None) -> bool: ...
    def suppress_kicks(self) -> None: ...


def make_queue(
    packed: bool,
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
) -> Virtqueue:
    """A started queue of the negotiated layout (vhost-user's avail/used are the
    packed ring's driver/device event areas)."""
    cls: type[SplitQueue] | type[PackedQueue] = PackedQueue if packed else SplitQueue
    return cls(
        index,
        size,
        mem,
        desc_addr=desc_addr,
        avail_addr=avail_addr,
        used_addr=used_addr,
        base=base,
        event_idx=event_idx,
        indirect=indirect,
    )
