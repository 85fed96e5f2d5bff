"""Differential runs of the C switch against the Python reference switch.

Each seed builds the same scene twice: a few guests, each one RX ring from
``tests.differential.build`` (random sizes, features, offloads, IOTLB, dirty
log, and with ``hostile`` rings a driver scribbled over), and a few endpoints
C cannot deliver to (what a Python-only uplink is). The same bursts (random
frames between a small pool of MACs: unicast, broadcast, multicast, moves,
frames to their own port, offloaded TCP frames with their accepted headers)
go once through :class:`vhostd.switch.Switch` over ``net.RxQueue`` and once
through :class:`vhostd.fastswitch.FastSwitch` over ``fastpath.FastRxQueue``,
with the clock moved between bursts (learning refresh, ageing) and endpoints
detached and attached again. Every observable must match: each guest's RAM
byte for byte, ring indices, queue counters, faults and the errors they left,
IOTLB denials reported, frames the other endpoints got, the MAC table as
``vhostd fdb`` shows it, and the switch's counters.

The guests are :class:`vhostd.session.Session` objects without a connection:
``send``, ``c_prepare``/``c_fill``/``c_finish`` and ``flush`` are the
session's own code.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from protocol.enums import VirtioFeature as VF
from tests.differential import Scenario, _alloc, build, queue_of, retry
from tests.offload_frames import csum_header, gso_header, tcp4, tcp6
from tests.vusim.dma import PhysicalDma
from tests.vusim.rings import Buffer, SplitRing
from vhostd.fastpath import FastRxQueue, FrameBurst
from vhostd.fastswitch import FastSwitch
from vhostd.native import ffi
from vhostd.net import Frame, QueueStats, RxQueue
from vhostd.offload import OFFLOAD_FEATURES, PLAIN, BadHeader, VnetHeader, check_tx
from vhostd.session import Session
from vhostd.stats import PortStats
from vhostd.switch import Switch
from vhostd.virtqueue import SplitQueue
from vhostd.vring import Vring

GUESTS = 3
UPLINKS = 2


class _Recorder:
    """What a session's nursery and misses are to ``send``: calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def start_soon(self, fn: Any, *args: Any) -> None:
        self.calls.append(tuple(args))

    async def access_failed(self, iova: int, need: int) -> None:
        raise AssertionError("only recorded")


class Guest(Session):
    """A session reduced to one RX ring on a scenario's guest RAM, no connection."""

    def __init__(self, name: str, s: Scenario, cls: type[RxQueue], backlog: int) -> None:
        self.name = name
        self.stats = PortStats()
        self.status = 0
        self.features = s.features
        self.scenario = s
        self.queue: SplitQueue = queue_of(s)
        self.rx = cls(self.queue, s.features, self.stats.queue(0), backlog)
        vring = Vring(0, size=s.ring.size, started=True, enabled=True)
        vring.rx = self.rx
        self.vrings = [vring]
        self._rx_ready = [vring]
        self._dirty = {}
        recorder = _Recorder()
        self._nursery = recorder  # type: ignore[assignment]
        self.misses = recorder  # type: ignore[assignment]
        self.recorder = recorder
        self.events: list[Any] = []


class Uplink:
    """An endpoint C does not deliver to: every frame through ``send``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[tuple[bytes, tuple[int, ...]]] = []

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        self.got.append((bytes(frame), tuple(hdr)))

    def flush(self) -> None:
        pass


MACS = [
    *(bytes([2, 0, 0, 0, 0x20, k]) for k in range(6)),
    b"\xff" * 6,
    bytes([1, 0, 0x5E, 0, 0, 1]),
    bytes([3, 0, 0, 0, 0, 9]),
]
"""Six unicast MACs (the first six: sources too), broadcast, multicast, another multicast."""


def _frame(rng: random.Random, macs: list[bytes]) -> tuple[bytes, VnetHeader]:
    dst, src = rng.choice(macs), rng.choice(macs[:6] + macs[:2])
    roll = rng.random()
    if roll < 0.15:
        v6 = rng.random() < 0.3
        payload = rng.randbytes(rng.choice([100, 1400, 3000, 5000]))
        frame = (tcp6 if v6 else tcp4)(payload, csum="partial")
        raw = gso_header(frame, 1448, v6) if len(payload) > 1448 else csum_header(frame, v6)
        frame = dst + src + frame[12:]
        got = check_tx(raw, frame, int(OFFLOAD_FEATURES))
        assert not isinstance(got, BadHeader), got
        return frame, got
    size = rng.choice([14, 60, 64, 200, 1500, 3000])
    return dst + src + rng.randbytes(size - 12), PLAIN


def run_switch(seed: int, fast: bool, hostile: bool) -> dict[str, Any]:
    """The scene of ``seed`` through one switch; every observable at the end."""
    rng = random.Random(seed)
    cls: type[RxQueue] = FastRxQueue if fast else RxQueue
    scenes = [build(seed * 16 + g, True, hostile) for g in range(GUESTS)]
    for s in scenes:
        if not hostile and rng.random() < 0.7:
            _fresh_ring(rng, s)
    try:
        return _run(rng, scenes, cls, FastSwitch if fast else Switch, not hostile)
    finally:
        for s in scenes:
            s.close()


def _fresh_ring(rng: random.Random, s: Scenario) -> None:
    """Swap the scenario's random ring for an empty one a sane driver fills (``_replenish``)."""
    dma = s.frontend if s.frontend is not None else PhysicalDma(s.ram)
    s.ring = SplitRing(s.ram, dma, size=rng.choice([16, 64, 256]), event_idx=s.ring.event_idx)  # type: ignore[arg-type]


def _replenish(rng: random.Random, g: Guest) -> None:
    """The driver takes back used buffers and posts fresh ones (until guest RAM runs out)."""
    ring, ram = g.scenario.ring, g.scenario.ram
    if g.vrings[0].failed is not None:
        return
    ring.collect_used()
    try:
        while rng.random() < 0.9:
            n = rng.choice([64, 200, 1600, 2048, 4096])
            bufs = [
                Buffer(_alloc(rng, ram, n), n, writable=True) for _ in range(rng.choice([1, 2]))
            ]
            ring.post(bufs)
    except (MemoryError, RuntimeError):  # guest RAM or free descriptors used up
        pass


def _run(
    rng: random.Random,
    scenes: list[Scenario],
    cls: type[RxQueue],
    sw_cls: type[Switch],
    replenish: bool,
) -> dict[str, Any]:
    ageing = rng.choice([2.0, 5.0, 300.0])
    switch = sw_cls(ageing, rng.choice([1, 2, 3, 8, 64]))
    guests = [Guest(f"g{i}", s, cls, rng.choice([0, 2, 8, 512])) for i, s in enumerate(scenes)]
    uplinks = [Uplink(f"u{i}") for i in range(UPLINKS)]
    endpoints: list[Any] = [*guests, *uplinks]
    for ep in endpoints:
        switch.attach(ep)
    for g in guests:
        if replenish:
            _replenish(rng, g)
    macs = MACS
    now = 1000.0
    for _ in range(rng.randrange(1, 40)):
        now += rng.choice([0.0, 0.0, 0.3, 1.5, ageing + 0.5])
        switch.now = now
        src = rng.choice(endpoints)
        frames = [_frame(rng, macs) for _ in range(rng.choice([1, 2, 5, 32, 64]))]
        hdrs = [h for _, h in frames]
        if rng.random() < 0.3:
            for data, hdr in frames:  # the per-frame path shares the table
                switch.forward(src, data, hdr)
        else:
            burst, keep = FrameBurst.of([data for data, _ in frames])
            if any(h is not PLAIN for h in hdrs):
                burst.hdrs = hdrs
            switch.forward_burst(src, burst)
            del keep
        switch.flush()
        for g in guests:  # the RX ring task: the backlog, misses answered
            if g.rx.backlog and g.vrings[0].failed is None:
                retry(g.scenario, g.events, g.rx.flush_backlog)
                g.queue.publish()
            if g.scenario.frontend is not None and rng.random() < 0.25:
                g.scenario.frontend.churn()
            if replenish and rng.random() < 0.7:
                _replenish(rng, g)
        roll = rng.random()
        if roll < 0.08:
            ep = rng.choice(endpoints)
            switch.detach(ep)
            switch.attach(ep)
    return {
        "guests": [_guest(g) for g in guests],
        "uplinks": [u.got for u in uplinks],
        "fdb": [(mac, ep.name, age) for mac, ep, age in switch.entries(now)],
        "counters": (
            switch.forwarded,
            switch.flooded,
            switch.filtered,
            switch.moves,
            switch.mac_entries,
        ),
    }


def _guest(g: Guest) -> dict[str, Any]:
    s, q = g.scenario, g.queue
    st = g.stats
    return {
        "events": g.events,
        "ram": [bytes(r.mem[:]) for r in s.ram.regions],
        "indices": (q.last_avail, q.last_used),
        "rx": {name: getattr(st.queue(0), name) for name in QueueStats.__slots__},
        "faults": dict(st.queue_faults),
        "failed": g.vrings[0].failed,
        "not_ready": st.rx_not_ready,
        "blocked": st.blocked_accesses,
        "denied": g.recorder.calls,
        "offload": (st.offload.segmented, st.offload.segments, st.offload.csum_completed),
        "backlog": [(bytes(f), tuple(h)) for f, h in g.rx.backlog],
        "log": None if s.log is None else bytes(ffi.buffer(s.log.c.bits, s.log.size)),
    }


@functools.cache
def switch_differential(seed: int, hostile: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    return run_switch(seed, False, hostile), run_switch(seed, True, hostile)


def compare_switch(ref: dict[str, Any], fast: dict[str, Any]) -> None:
    for key in ("counters", "fdb", "uplinks"):
        assert fast[key] == ref[key], key
    for i, (a, b) in enumerate(zip(ref["guests"], fast["guests"], strict=True)):
        for key in a:
            assert a[key] == b[key], f"guest {i}: {key}"


def features_used(seed: int) -> int:
    """The guests' features of ``seed`` OR'ed (tests check the seeds cover offloads)."""
    out = 0
    for g in range(GUESTS):
        s = build(seed * 16 + g, True)
        out |= s.features
        s.close()
    return out & int(VF.NET_GUEST_TSO4 | VF.NET_GUEST_CSUM)
