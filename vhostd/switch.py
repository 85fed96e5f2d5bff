"""A learning L2 switch joining every port and uplink of the daemon.

Each attached :class:`Endpoint` (a vhost-user port, a TAP uplink) hands
frames in with :meth:`Switch.forward`; the switch learns the source MAC,
then sends the frame to the port that last spoke from the destination MAC,
or floods it when the destination is unknown, broadcast or multicast.
Entries age out, and the table is bounded: when full, the oldest entry
goes, so a flood of forged source MACs cannot grow memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from .net import Frame


class Endpoint(Protocol):
    """Something frames can be sent to: a port or an uplink."""

    name: str

    def send(self, frame: Frame) -> None:
        """Take a copy of ``frame`` (it is only valid during this call)."""

    def flush(self) -> None:
        """Make what ``send`` delivered visible (publish, interrupt), once per burst."""


class Switch:
    """MAC learning, forwarding and flooding; single-threaded by design."""

    def __init__(self, ageing: float = 300.0, table_size: int = 4096) -> None:
        self.ageing = ageing
        self.table_size = table_size
        self._table: OrderedDict[bytes, tuple[Endpoint, float]] = OrderedDict()
        self._endpoints: list[Endpoint] = []
        self._touched: dict[Endpoint, None] = {}
        self.flooded = 0
        self.forwarded = 0
        self.filtered = 0
        self.now = time.monotonic()

    @property
    def mac_entries(self) -> int:
        return len(self._table)

    def attach(self, endpoint: Endpoint) -> None:
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)

    def detach(self, endpoint: Endpoint) -> None:
        """Remove an endpoint and every MAC learnt on it."""
        if endpoint in self._endpoints:
            self._endpoints.remove(endpoint)
        for mac in [m for m, (ep, _) in self._table.items() if ep is endpoint]:
            del self._table[mac]

    def tick(self) -> None:
        """Take the time once per burst rather than once per frame."""
        self.now = time.monotonic()

    def forward(self, src: Endpoint, frame: Frame) -> None:
        """Switch one frame that ``src`` sent."""
        table = self._table
        now = self.now
        smac = bytes(frame[6:12])
        if not smac[0] & 1:
            entry = table.get(smac)
            if entry is None or entry[0] is not src:
                table[smac] = (src, now)
                table.move_to_end(smac)
                if len(table) > self.table_size:
                    table.popitem(last=False)
            elif now - entry[1] > 1.0:
                table[smac] = (src, now)
                table.move_to_end(smac)
        dmac = bytes(frame[0:6])
        if not dmac[0] & 1:
            entry = table.get(dmac)
            if entry is not None and now - entry[1] <= self.ageing:
                dst = entry[0]
                if dst is src:
                    self.filtered += 1
                else:
                    self.forwarded += 1
                    dst.send(frame)
                    self._touched[dst] = None
                return
        self.flooded += 1
        touched = self._touched
        for ep in self._endpoints:
            if ep is not src:
                ep.send(frame)
                touched[ep] = None

    def touch(self, endpoint: Endpoint) -> None:
        """Note that ``endpoint`` was sent frames outside ``forward``."""
        self._touched[endpoint] = None

    def flush(self) -> None:
        """End of a burst: let every endpoint that got frames publish them."""
        touched = self._touched
        if touched:
            for ep in touched:
                ep.flush()
            touched.clear()

    def expire(self) -> int:
        """Drop entries older than the ageing time; returns how many went."""
        cutoff = time.monotonic() - self.ageing
        old = [m for m, (_, seen) in self._table.items() if seen < cutoff]
        for mac in old:
            del self._table[mac]
        return len(old)
