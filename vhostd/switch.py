"""A learning L2 switch joining every port and uplink of the daemon.

Each attached :class:`Endpoint` (a vhost-user port, a TAP uplink) hands
frames in with :meth:`Switch.forward` (a port's whole TX burst with
:meth:`Switch.forward_burst`); the switch learns the source MAC,
then sends the frame to the port that last spoke from the destination MAC,
or floods it when the destination is unknown, broadcast or multicast.
Entries age out, and the table is bounded: when full, the oldest entry
goes, so a flood of forged source MACs cannot grow memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .net import Frame
from .offload import PLAIN, VnetHeader

if TYPE_CHECKING:
    from .fastpath import FrameBurst


class Endpoint(Protocol):
    """Something frames can be sent to: a port or an uplink."""

    name: str

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        """Take a copy of ``frame`` (it is only valid during this call).

        ``hdr`` is its offload metadata as the sender's header checks accepted
        it: each endpoint hands it on only if its receiver can take it, and
        otherwise segments or checksums the frame itself (``offload``).
        """

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
        self._watchers: list[Callable[[], None]] = []
        self._flooded = 0
        self._forwarded = 0
        self._moves = 0
        self._filtered = 0
        self.now = time.monotonic()

    @property
    def mac_entries(self) -> int:
        return len(self._table)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._endpoints)

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every attach and detach (a TAP re-deciding its
        offloads from its peers'); a session attaches again when its rings restart
        with new features."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    @property
    def flooded(self) -> int:
        """Frames sent to every port but their source (unknown, broadcast, multicast)."""
        return self._flooded

    @property
    def forwarded(self) -> int:
        """Frames sent to the one port their destination MAC was learnt on."""
        return self._forwarded

    @property
    def moves(self) -> int:
        """Times a known MAC appeared on another port (a migrated guest, or a forger)."""
        return self._moves

    @property
    def filtered(self) -> int:
        """Frames whose destination lives on the port they came from: not sent."""
        return self._filtered

    def attach(self, endpoint: Endpoint) -> None:
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)
        self._changed()

    def detach(self, endpoint: Endpoint) -> None:
        """Remove an endpoint and every MAC learnt on it."""
        if endpoint in self._endpoints:
            self._endpoints.remove(endpoint)
        for mac in [m for m, (ep, _) in self._table.items() if ep is endpoint]:
            del self._table[mac]
        self._changed()

    def tick(self) -> None:
        """Take the time once per burst rather than once per frame."""
        self.now = time.monotonic()

    def _route(self, src: Endpoint, smac: bytes, dmac: bytes) -> Endpoint | None:
        """Learn ``smac`` on ``src``; where ``dmac`` goes (None: flood, ``src``: filter).

        Calling it again with the same MACs in the same tick changes nothing
        and answers the same: that is what lets ``forward_burst`` decide once
        for a run of frames.
        """
        table = self._table
        now = self.now
        if not smac[0] & 1:
            entry = table.get(smac)
            if entry is None or entry[0] is not src:
                if entry is not None:
                    self._moves += 1  # a migrated guest: its new port owns the MAC at once
                table[smac] = (src, now)
                table.move_to_end(smac)
                if len(table) > self.table_size:
                    table.popitem(last=False)
            elif now - entry[1] > 1.0:
                table[smac] = (src, now)
                table.move_to_end(smac)
        if not dmac[0] & 1:
            entry = table.get(dmac)
            if entry is not None and now - entry[1] <= self.ageing:
                return entry[0]
        return None

    def forward(self, src: Endpoint, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        """Switch one frame that ``src`` sent, with its offload metadata."""
        dst = self._route(src, bytes(frame[6:12]), bytes(frame[0:6]))
        if dst is not None:
            if dst is src:
                self._filtered += 1
            else:
                self._forwarded += 1
                dst.send(frame, hdr)
                self._touched[dst] = None
            return
        self._flooded += 1
        touched = self._touched
        for ep in self._endpoints:
            if ep is not src:
                ep.send(frame, hdr)
                touched[ep] = None

    def forward_burst(self, src: Endpoint, burst: FrameBurst) -> None:
        """``forward`` for each frame of a TX burst, unicast runs delivered in C.

        Consecutive frames with the same MACs get one decision; a run whose
        destination is a session goes into its RX ring through
        ``send_burst`` (one C call for as many frames as fit), and the frame
        that stops it through ``send``, which decides it exactly as alone.
        Floods and other endpoints (TAP) go frame by frame through ``forward``.
        Each destination sees the frames in the order sent. A burst with
        offload headers (``burst.hdrs``) goes frame by frame with them; frames
        under an Ethernet header (refused ones) go nowhere.
        """
        n = len(burst)
        if burst.hdrs is not None:
            for k, hdr in enumerate(burst.hdrs):  # offloads: each frame as alone
                frame = burst.view(k)
                if len(frame) >= 14:
                    self.forward(src, frame, hdr)
            return
        touched = self._touched
        i = 0
        while i < n:
            j = burst.mac_run(i)
            macs = burst.macs(i)
            dst = self._route(src, macs[6:12], macs[0:6]) if len(macs) == 12 else None
            send_burst = getattr(dst, "send_burst", None)
            if dst is src:
                self._filtered += j - i
            elif dst is None or send_burst is None:
                for k in range(i, j):
                    self.forward(src, burst.view(k))
            else:
                self._forwarded += j - i
                k = i + send_burst(burst, i, False, j)
                while k < j:
                    dst.send(burst.view(k))  # the frame the batch stopped at
                    k += 1
                    if k < j:
                        k += send_burst(burst, k, False, j)
                touched[dst] = None
            i = j

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

    def entries(self, now: float | None = None) -> list[tuple[bytes, Endpoint, float]]:
        """The MAC table as (MAC, endpoint, age in seconds), youngest first; aged-out
        entries the periodic sweep has not removed yet are left out, as lookups do."""
        now = time.monotonic() if now is None else now
        live = [
            (mac, ep, max(0.0, now - seen))
            for mac, (ep, seen) in self._table.items()
            if now - seen <= self.ageing
        ]
        return sorted(live, key=lambda entry: entry[2])

    def expire(self) -> int:
        """Drop entries older than the ageing time; returns how many went."""
        cutoff = time.monotonic() - self.ageing
        old = [m for m, (_, seen) in self._table.items() if seen < cutoff]
        for mac in old:
            del self._table[mac]
        return len(old)
