"""The data path of a started ring: one task that works the ring whenever it is kicked.

Every round is synchronous: it touches guest memory only between two awaits
and keeps no translated view across one, so the session's request handlers
(IOTLB INVALIDATE above all) always run with no access in flight.

The loop raises what breaks a ring (:class:`~vhostd.virtqueue.QueueError`,
:class:`~vhostd.iotlb.IotlbDenied`, :class:`~vhostd.guestmem.AccessError`);
the session decides what that means, as it does for the same errors on its
switch side.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from .guestmem import AccessError
from .iotlb import IotlbError, IotlbMiss
from .virtqueue import QueueError
from .vring import Vring, drain, signal

if TYPE_CHECKING:
    from .misses import Misses
    from .net import Sink
    from .port import Port
    from .source import SourceRing
    from .vqueue import Virtqueue

T = TypeVar("T")


def _poll_us(default: int = 100) -> int:
    """``VHOSTD_POLL_US`` from the environment: 0 or more microseconds, else the default."""
    raw = os.environ.get("VHOSTD_POLL_US", "")
    return int(raw) if raw.isdigit() else default


POLL_SECONDS = _poll_us() / 1e6
"""How long a switch or reflect port's TX ring that just moved frames keeps polling
before it asks for kicks and sleeps (Linux vhost-net's busyloop_timeout).

Without it, when the front-end hands frames back within a few tens of
microseconds (two ports bouncing frames through the switch), the ring goes
to sleep after every burst, each next burst costs the front-end a kick and
vhostd a wake-up, and the two sides settle into taking turns on one lump of
frames, or not, from run to run: the bimodal switch case (README,
"Performance"). Polling on keeps both sides busy at once; an idle ring still
sleeps after this long. ``VHOSTD_POLL_US`` in the environment sets it
(microseconds; 0 turns polling off).
"""


async def _polled(queue: Virtqueue, until: float) -> bool:
    """Poll the ring until ``until`` (monotonic seconds); True as soon as chains are there.

    Each look ends at a Trio checkpoint, so the other tasks run in between.
    A ring that cannot be looked at now (a miss) counts as having chains: the
    round that follows meets the miss and handles it.
    """
    while time.monotonic() < until:
        await trio.lowlevel.checkpoint()
        try:
            queue.refresh()
            if queue.has_available():
                return True
        except (IotlbError, QueueError, AccessError):
            return True
    return False


def interrupt(vring: Vring, queue: Virtqueue) -> None:
    """Signal the guest through the call fd, unless the driver suppressed it."""
    q = vring.tx or vring.rx
    assert q is not None
    if queue.needs_interrupt():
        if signal(vring.call):
            q.stats.interrupts += 1
    else:
        q.stats.suppressed += 1


def publish(vring: Vring, queue: Virtqueue) -> None:
    """Make what was put on ``queue`` visible, then interrupt as the driver asked."""
    queue.publish()
    if queue.published:
        interrupt(vring, queue)


class RingLoop:
    """What every ring task of one session runs.

    ``sink`` takes each frame a TX ring sends (the session's ``_sink``, which
    ``fastpath`` recognises to hand it whole bursts); ``misses`` answers the
    IOTLB misses a round stops at.
    """

    def __init__(self, port: Port, sink: Sink, misses: Misses) -> None:
        self.port = port
        self.sink = sink
        self.misses = misses

    async def run(self, vring: Vring) -> None:
        """Process the ring whenever it is kicked, until cancelled or broken."""
        q = vring.tx or vring.rx
        assert q is not None and vring.kick is not None
        kick, queue, stats = vring.kick, q.queue, q.stats
        await self._translated(vring, queue.sync_from_used)
        work = self._rx_round if vring.is_rx else self._tx_round
        source = self.port.source
        filler = source.ring(vring.rx) if source is not None and vring.rx is not None else None
        if filler is not None:
            work = functools.partial(self._source_round, filler)
        resolve = self.misses.resolve
        poll = vring.tx is not None and self.port.forward_burst is not None
        last_busy = 0.0
        while True:
            # _translated inlined: this runs once per burst.
            try:
                busy = work(vring)
            except IotlbMiss as miss:
                await resolve(vring, miss)
                # A request read with the UPDATE that woke us may have stopped the
                # ring (GET_VRING_BASE, SET_STATUS 0): a task already rescheduled is
                # not interrupted by its scope's cancel, so take it here.
                await trio.lowlevel.checkpoint_if_cancelled()
                continue
            if busy:
                if poll:
                    last_busy = time.monotonic()
                await trio.lowlevel.checkpoint()
                continue
            if poll and await _polled(queue, last_busy + POLL_SECONDS):
                continue
            rx = vring.rx
            if rx is not None and filler is None and not rx.backlog:
                # Nothing waits for this RX ring's buffers: no kick is wanted when
                # the driver posts more (it would cost it a syscall and us a
                # wake-up per refill). Frames come from the switch side, which
                # wakes this task itself when the first one has to wait.
                queue.suppress_kicks()
                await trio.lowlevel.wait_readable(kick)
                vring.kick_reads += drain(kick)
                stats.kicks += 1
                continue
            if rx is not None and rx.backlog and filler is None:
                more = await self._translated(
                    vring, functools.partial(queue.want_kicks, rx.stalled_at)
                )
            else:
                more = await self._translated(vring, queue.want_kicks)
            if more and (
                vring.tx is not None
                or (rx is not None and rx.backlog)
                or (filler is not None and vring.enabled and not filler.stuck)
            ):
                # Chains came while we were arming kicks: go on, but never
                # without letting the other tasks run.
                await trio.lowlevel.checkpoint()
                continue
            await trio.lowlevel.wait_readable(kick)
            vring.kick_reads += drain(kick)
            stats.kicks += 1
            queue.suppress_kicks()

    async def _translated(self, vring: Vring, step: Callable[[], T]) -> T:
        """Run ``step``; on an IOTLB miss, ask the front-end and run it again.

        The step leaves the ring consistent when it raises (chains taken so far
        are published, the missing one is not taken), so running it again
        resumes exactly where it stopped: no packet is lost to a miss.
        """
        while True:
            try:
                return step()
            except IotlbMiss as miss:
                await self.misses.resolve(vring, miss)
                await trio.lowlevel.checkpoint_if_cancelled()  # stopped meanwhile? (see run)

    def _tx_round(self, vring: Vring) -> bool:
        tx = vring.tx
        assert tx is not None
        port = self.port
        port.tick()
        taken = 0
        try:
            taken = tx.burst(self.sink if vring.enabled else None)
        finally:
            port.flush()
            if tx.queue.published:
                interrupt(vring, tx.queue)
        return taken > 0

    def _rx_round(self, vring: Vring) -> bool:
        rx = vring.rx
        assert rx is not None
        if not rx.backlog or not vring.enabled:
            return False
        done = 0
        try:
            done = rx.flush_backlog()
        finally:
            publish(vring, rx.queue)
        return done > 0 and bool(rx.backlog)

    def _source_round(self, filler: SourceRing, vring: Vring) -> bool:
        """Source mode: fill the RX buffers the guest posted; True if there may be more."""
        if not vring.enabled:
            return False
        rx = filler.rx
        done = 0
        try:
            done = filler.fill()
        finally:
            publish(vring, rx.queue)
        return done > 0 and not filler.stuck
