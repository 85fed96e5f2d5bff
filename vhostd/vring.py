"""What the front-end told us about one vring, and its eventfds.

A :class:`Vring` is control-plane state (size, addresses, base, fds, enable)
plus, while started, the queue object the data path runs on. Started and
enabled are independent, as vhost-user defines them: a ring starts on
SET_VRING_KICK and stops on GET_VRING_BASE; enable only says whether the
device may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from protocol import VringAddr

from .net import RxQueue, TxQueue

_ONE = (1).to_bytes(8, "little")


def signal(fd: int | None) -> bool:
    """Write an eventfd (an interrupt through the call fd, a self-kick...)."""
    if fd is None:
        return False
    try:
        os.write(fd, _ONE)
    except OSError:
        return False
    return True


def drain(fd: int) -> int:
    """Consume an eventfd's count after it became readable; returns the count."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except OSError:
        return 0


def close_fd(fd: int | None) -> None:
    """Close an fd that a trio task may be waiting on."""
    if fd is None:
        return
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass(eq=False)
class Vring:
    """One virtqueue's control state, as set by the front-end."""

    index: int
    size: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False
    failed: str | None = None
    tx: TxQueue | None = None
    rx: RxQueue | None = None
    scope: trio.CancelScope | None = field(default=None, repr=False)
    kick_reads: int = 0
    """The count read from the current kick fd so far (every write adds one)."""
    kick_writes: int = 0
    """Writes vhostd itself made to the current kick fd (to wake the ring's task);
    the rest of ``kick_reads`` came from the front-end (see ``diagnosis``)."""

    @property
    def is_rx(self) -> bool:
        return self.index % 2 == 0

    @property
    def running(self) -> bool:
        """The data path may touch this ring now."""
        return self.started and self.failed is None

    @property
    def next_avail(self) -> int:
        """What GET_VRING_BASE reports: where the driver should resume."""
        q = self.tx or self.rx
        return q.queue.base if q is not None else self.base

    def stop(self) -> None:
        """Cancel the ring's task and forget the data-path objects."""
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
        self.started = False
        self.tx = self.rx = None

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            close_fd(getattr(self, name))
            setattr(self, name, None)
