"""The device-IOTLB misses of one connection: MISS out, UPDATE back, or give up.

A ring step that needs a translation the IOTLB lacks raises
:class:`~vhostd.iotlb.IotlbMiss`; the ring task hands it to
:meth:`Misses.resolve`, which asks the front-end on the back-end channel and
waits, bounded, for the UPDATE. The session's synchronous IOTLB_MSG handler
calls :meth:`Misses.updated` once the UPDATE is in the IOTLB, which wakes every
waiting queue; each then runs its step again.

Nothing here keeps a translated view across an await: the look-ahead walks
chains and drops its views before the first MISS goes out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from protocol import IotlbPerm, IotlbType

from .guestmem import AccessError, GuestMemory
from .iotlb import IotlbError, IotlbMiss, PendingMisses
from .packed import PackedQueue
from .virtqueue import QueueError

if TYPE_CHECKING:
    from .channel import BackendChannel
    from .stats import PortStats
    from .vring import Vring

MISS_LOOKAHEAD = 64
"""How many available chains a queue that missed scans for more pages to ask for."""
MISS_OUTSTANDING = 16
"""Most MISSes a connection keeps outstanding for look-ahead: QEMU answers them one
round trip at a time, and a long queue of guesses would delay the MISS a ring
is actually stuck on."""
MISS_TIMEOUT = 5.0
"""Seconds a queue waits for the front-end to answer a MISS before giving up.

QEMU answers a MISS within milliseconds when the guest mapped the address
and never when it did not, so this bounds how long a bad address can park
a queue, not how long a good one takes. It is generous because a QEMU whose
main loop is busy (TCG, a storm of misses) was seen taking over 2 s.
"""


class Misses:
    """The MISSes one connection has outstanding, and the queues waiting on them.

    ``backend`` returns the session's current back-end channel (it is replaced
    by each SET_BACKEND_REQ_FD and gone after teardown), read at each send.
    """

    def __init__(
        self,
        stats: PortStats,
        mem: GuestMemory,
        backend: Callable[[], BackendChannel | None],
        timeout: float,
    ) -> None:
        self.stats = stats
        self.mem = mem
        self.backend = backend
        self.timeout = timeout
        self.pending = PendingMisses()
        self._changed = trio.Event()

    async def resolve(self, vring: Vring, miss: IotlbMiss) -> None:
        """Send one MISS per page and wait, bounded, for the UPDATE.

        The pages the next available chains will need are asked for at the
        same time: QEMU answers each MISS in a round trip through its main
        loop, and a queue that asked one page at a time would pay that round
        trip once per packet.
        """
        # Taken before the MISS goes out: the UPDATE can be handled while send_iotlb
        # awaits, and it replaces `_changed` with a fresh Event nobody will set.
        changed = self._changed
        # A look-ahead's MISS unanswered for a whole timeout gets no answer any
        # more: the page was unmapped before the front-end looked. Waiting on
        # it would fail a queue that never asked; asking again is right.
        self.pending.expire(trio.current_time() - self.timeout)
        sent = self.pending.sent_at(miss.iova, miss.perm)
        ahead = self.pending.ahead(miss.iova, miss.perm)
        if sent is None:
            sent = await self._send(miss)
        for next_miss in self._ahead(vring):
            if len(self.pending) >= MISS_OUTSTANDING:
                break
            # Checked again at each send: the UPDATE for a page found missing
            # may have come in while the previous send awaited, and a MISS for
            # a page already translated would be answered only if the guest
            # still maps it by the time the front-end looks.
            if (next_miss.iova, next_miss.perm) not in self.pending and self._lacks(next_miss):
                await self._send(next_miss, ahead=True)
        with trio.move_on_at(sent + self.timeout):
            await changed.wait()
            return
        self.pending.forget(miss.iova, miss.perm)
        if ahead:
            return  # a look-ahead's MISS went unanswered: the retry sends one of its own
        self.stats.iotlb_miss_timeouts += 1
        await self.access_failed(miss.iova, miss.perm)
        raise AccessError(f"IOTLB miss at iova {miss.iova:#x} unanswered for {self.timeout}s")

    def updated(self, iova: int, size: int) -> None:
        """An UPDATE for ``[iova, iova+size)`` is in the IOTLB: wake every waiting queue.

        Called from the synchronous request handler, right after the IOTLB
        update, so a woken queue finds the translation there.
        """
        now = trio.current_time()
        for sent in self.pending.resolve(iova, size):
            self.stats.iotlb_miss_time.observe(now - sent)
        self._changed.set()
        self._changed = trio.Event()

    def clear(self) -> None:
        """Forget every outstanding MISS (the device was reset)."""
        self.pending.clear()

    async def access_failed(self, iova: int, perm: IotlbPerm) -> None:
        """Tell the front-end an access at ``iova`` failed (ACCESS_FAIL), if it can hear."""
        self.stats.access_failures += 1
        backend = self.backend()
        if backend is not None:
            await backend.send_iotlb(IotlbType.ACCESS_FAIL, iova, perm)

    async def _send(self, miss: IotlbMiss, ahead: bool = False) -> float:
        backend = self.backend()
        now = trio.current_time()
        self.pending.add(miss.iova, miss.perm, now, ahead)  # before the UPDATE can answer it
        if backend is None or not await backend.send_iotlb(IotlbType.MISS, miss.iova, miss.perm):
            self.pending.forget(miss.iova, miss.perm)
            raise AccessError(f"IOTLB miss at {miss.iova:#x} and no back-end channel")
        self.stats.iotlb_miss_sent += 1
        return now

    def _lacks(self, miss: IotlbMiss) -> bool:
        """The IOTLB still has no entry granting ``miss.perm`` at ``miss.iova``."""
        iotlb = self.mem.iotlb
        entry = iotlb.entry_at(miss.iova) if iotlb is not None else None
        return entry is None or (entry[3] & miss.perm) != miss.perm

    def _ahead(self, vring: Vring) -> list[IotlbMiss]:
        """The translations the next available chains lack, found without taking them."""
        q = vring.tx
        if q is None or self.mem.iotlb is None:
            # TX only. RX look-ahead works (a lazy-mode guest's DMAR faults came
            # from look-ahead MISSes for pages translated meanwhile, now checked
            # before each send) but made the vIOMMU guest run slower: 52 s vs
            # 43 s for tests/e2e/test_qemu_viommu.py, its RX buffers mostly
            # sharing pages that one MISS already brings in.
            return []
        queue = q.queue
        found: list[IotlbMiss] = []
        views: list[memoryview] = []
        try:
            queue.refresh()
            if isinstance(queue, PackedQueue):
                heads: Iterable[int] = queue.chain_starts(MISS_LOOKAHEAD)
            else:
                heads = (queue.head(n) for n in range(min(queue.available(), MISS_LOOKAHEAD)))
            for head in heads:
                views.clear()
                try:
                    queue.walk(head, vring.is_rx, views)
                except IotlbMiss as ahead:
                    found.append(ahead)
        except (IotlbError, QueueError, AccessError):
            pass  # whatever is wrong is reported when the queue gets there
        return found
