"""Per-port counters, kept as plain ints on the data path.

Everything here is written by the daemon's single thread and read by the
metrics publisher; nothing on the hot path calls into prometheus-client.
Counters survive reconnects of the front-end: they belong to the port.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from .iotlb import IotlbStats
from .net import QueueStats

MISS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


@dataclass(slots=True)
class Histogram:
    """A fixed-bucket histogram (Prometheus semantics: cumulative on export)."""

    bounds: tuple[float, ...] = MISS_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(MISS_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass(slots=True, frozen=True)
class LastError:
    """The newest protocol error, queue fault or memory fault of a port."""

    time: float
    """Unix time (wall clock, for people reading ``vhostd status``)."""
    kind: str
    """The metric label it was counted under (``bad_vring_addr``, ``head_out_of_range``...)."""
    message: str


@dataclass(slots=True)
class OffloadStats:
    """What the switch did in software for a receiver that lacked an offload."""

    segmented: int = 0
    """GSO super-frames cut into segments for this port."""
    segments: int = 0
    """The frames those cuts made."""
    csum_completed: int = 0
    """Partial checksums finished for this port."""


@dataclass(slots=True)
class PortStats:
    """What a port did since the daemon started."""

    connections: int = 0
    disconnects: int = 0
    requests: int = 0
    protocol_errors: Counter[str] = field(default_factory=Counter)
    queue_faults: Counter[str] = field(default_factory=Counter)
    iotlb: IotlbStats = field(default_factory=IotlbStats)
    iotlb_entries: int = 0
    iotlb_miss_sent: int = 0
    iotlb_miss_timeouts: int = 0
    iotlb_miss_time: Histogram = field(default_factory=Histogram)
    access_failures: int = 0
    blocked_accesses: int = 0
    rx_not_ready: int = 0
    memory_faults: int = 0
    log_pages: int = 0
    """Dirty-log bits set in logs already retired (the live log counts its own)."""
    log_resizes: int = 0
    log_overflow: int = 0
    queues: dict[tuple[int, str], QueueStats] = field(default_factory=dict)
    offload: OffloadStats = field(default_factory=OffloadStats)
    last_error: LastError | None = None
    """Kept across reconnects: why the previous connection went wrong is worth seeing."""

    def note_error(self, kind: str, message: str) -> None:
        """Remember the newest error (its counter is counted where it happened)."""
        self.last_error = LastError(time.time(), kind, message)

    def queue(self, index: int) -> QueueStats:
        """The counters of vring ``index`` (kept across reconnects)."""
        key = (index // 2, "rx" if index % 2 == 0 else "tx")
        stats = self.queues.get(key)
        if stats is None:
            stats = self.queues[key] = QueueStats()
        return stats

    def totals(self, direction: str) -> QueueStats:
        """Sum of every queue's counters in one direction ("rx" or "tx")."""
        out = QueueStats()
        for (_, d), s in self.queues.items():
            if d == direction:
                for name in QueueStats.__slots__:
                    setattr(out, name, getattr(out, name) + getattr(s, name))
        return out
