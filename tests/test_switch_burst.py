"""Switch ports hand whole TX bursts to ``Switch.forward_burst``.

Runs of unicast frames for one guest go into its RX ring in one C call; what
every guest (and a TAP-like uplink) ends up with must be exactly what the
per-frame path (``Port.forward_burst`` off) gives it: the same frames, in the
same order, on the same queues, with the same counters, through learning,
floods, a destination ring that runs out mid-burst (backlog, then drops), a
destination whose IOTLB misses, and two RX queues.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

from protocol import VirtioFeature
from tests.probe import count_batches, ports, session, until
from tests.vusim import net as vnet
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from vhostd import fastpath
from vhostd.daemon import Daemon
from vhostd.net import Frame
from vhostd.offload import PLAIN, VnetHeader
from vhostd.port import Port

pytestmark = pytest.mark.skipif(
    not fastpath.ENABLED, reason="VHOSTD_FASTPATH=0: there is no batch path to compare"
)

BCAST = b"\xff" * 6
MCAST = b"\x01\x00\x5e\x00\x00\x01"
UNKNOWN = b"\x02\x00\x00\x00\xee\x01"


def mac(k: int) -> bytes:
    return bytes([2, 0, 0, 0, 0x10, k])


A, A2, B, C, T = mac(1), mac(2), mac(3), mac(4), mac(6)
"""Guest A (A2: a second MAC behind it), guests B and C, the uplink T.
B[5] ^ A[5] is even and B[5] ^ A2[5] odd: the two pick different RX queues of B."""


class Numbered:
    """Numbers frames so each one is unique and its order visible."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, dst: bytes, src: bytes, size: int = 0) -> bytes:
        self.n += 1
        size = size or 60 + self.n % 37
        body = self.n.to_bytes(4, "big") * (size // 4 + 1)
        return dst + src + b"\x88\xb5" + body[: size - 14]


class Uplink:
    """A non-session endpoint (what a TAP uplink is to the switch)."""

    name = "uplink"

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        self.got.append(bytes(frame))

    def flush(self) -> None:
        pass


@dataclass
class Outcome:
    """What the guests and the uplink received, and every counter that says so."""

    frames: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)


def _counters(daemon: Daemon, outs: list[Port], guests: list[dict[str, Any]]) -> dict[str, Any]:
    """Every counter the two paths must agree on.

    Publish/interrupt decisions (one per burst per destination) too, except
    for a guest with the IOTLB on: how many RX rounds its backlog takes
    depends on when the MISS answers arrive.
    """
    sw = daemon.switch
    out: dict[str, Any] = {
        "switch": (sw.forwarded, sw.flooded, sw.filtered, sw.mac_entries),
    }
    for port, guest in zip(outs, guests, strict=True):
        st = port.stats
        timed = guest.get("iommu", False)
        out[port.name] = (
            st.rx_not_ready,
            st.queue_faults.total(),
            {
                key: (q.packets, q.bytes, q.dropped, 0 if timed else q.interrupts + q.suppressed)
                for key, q in sorted(st.queues.items())
            },
        )
    return out


def _backlogs_empty(outs: list[Port]) -> bool:
    for port in outs:
        s = port.session
        if s is None:
            continue
        for v in s.vrings:
            if v.rx is not None and v.rx.backlog:
                return False
    return True


class Harness:
    """Guests on switch ports, and collection of what each RX queue got."""

    def __init__(self, daemon: Daemon, outs: list[Port], fes: list[Frontend]) -> None:
        self.daemon, self.ports, self.fes = daemon, outs, fes
        self.outcome = Outcome()

    async def settle(self) -> None:
        """Wait until nothing waits in a backlog, then take what the guests got."""
        await until(lambda: _backlogs_empty(self.ports), timeout=10)
        for g, (port, fe) in enumerate(zip(self.ports, self.fes, strict=True)):
            for q in fe.vrings:
                if q % 2:
                    continue
                got = self.outcome.frames.setdefault((g, q), [])
                want = port.stats.queue(q).packets - len(got)
                if want:
                    got += await vnet.recv_frames(fe, q, 5.0, count=want, refill=False)
                assert len(got) == port.stats.queue(q).packets


async def run_switch(
    batched: bool, guests: list[dict[str, Any]], script: Callable[[Harness], Awaitable[None]]
) -> tuple[Outcome, list[int]]:
    """Run ``script`` on one switch port per guest; returns the outcome and the batch sizes."""
    with pytest.MonkeyPatch.context() as mp:
        batches = count_batches(mp)
        async with (
            ports(*["switch"] * len(guests), queue_pairs=2) as (daemon, outs),
            AsyncExitStack() as stack,
        ):
            if not batched:
                for port in outs:
                    port.forward_burst = None
            fes = [await stack.enter_async_context(Frontend.connect(p.config.socket)) for p in outs]
            for fe, g in zip(fes, guests, strict=True):
                await fe.net_setup(
                    queue_pairs=g.get("qp", 1),
                    iommu=g.get("iommu", False),
                    features=g.get("features"),
                )
            for port, g in zip(outs, guests, strict=True):
                for v in session(port).vrings:
                    if v.rx is not None and "backlog" in g:
                        v.rx.backlog_limit = g["backlog"]
            h = Harness(daemon, outs, fes)
            await script(h)
            await h.settle()
            h.outcome.counters = _counters(daemon, outs, guests)
    return h.outcome, batches


async def _three_ports(h: Harness) -> None:
    """Learning, unicast runs, floods, an uplink, a filled ring and IOTLB misses."""
    fa, fb, fc = h.fes
    f = Numbered()
    up = Uplink()
    h.outcome.frames[(-1, 0)] = up.got
    sw = h.daemon.switch
    sw.attach(up)
    fa.post_rx(0, 64)
    fb.post_rx(0, 24)
    fb.post_rx(2, 64)
    fc.post_rx(0, 96)
    # Learning: B, C and the uplink speak first (floods to everyone else).
    await fb.send_frames(1, [f(BCAST, B)])
    await fc.send_frames(1, [f(BCAST, C)])
    sw.tick()
    sw.forward(up, f(BCAST, T))
    sw.flush()
    await h.settle()
    # One burst from A: unicast runs, single frames, floods, filtered, the uplink.
    burst = (
        [f(B, A) for _ in range(6)]
        + [f(C, A) for _ in range(3)]
        + [f(BCAST, A), f(BCAST, A2)]
        + [f(UNKNOWN, A) for _ in range(2)]
        + [f(T, A) for _ in range(3)]
        + [f(B, A2) for _ in range(4)]
        + [f(A, A2), f(A2, A)]
        + [f(MCAST, A) for _ in range(3)]
        + [f(B, A), f(C, A), f(B, A2), f(C, A), f(B, A)]
        + [f(B, A) for _ in range(6)]
    )
    await fa.send_frames(1, burst)
    await h.settle()
    # B's first RX queue runs out mid-burst: 4 buffers left of 24, then a backlog of 8.
    assert h.ports[1].stats.queue(0).packets == 20
    await fa.send_frames(1, [f(B, A, 60 + k) for k in range(20)] + [f(C, A)])
    await until(lambda: h.ports[1].stats.queue(0).dropped == 20 - 4 - 8, timeout=10)
    fb.post_rx(0, 64)
    await h.settle()
    # And once more with room everywhere.
    await fa.send_frames(1, [f(B, A), f(B, A2), f(C, A), f(B, A)] * 4)


@pytest.mark.trio
async def test_three_switch_ports_batched_equals_per_frame() -> None:
    guests = [{}, {"qp": 2, "backlog": 8}, {"iommu": True}]
    batched, sizes = await run_switch(True, guests, _three_ports)
    per_frame, none = await run_switch(False, guests, _three_ports)
    assert batched.frames == per_frame.frames
    assert batched.counters == per_frame.counters
    assert none == []
    # The batch path really ran: at least the first run of six for B went in one call.
    assert max(sizes) >= 6
    # Sanity on the outcome itself, not only on the two paths agreeing.
    assert batched.frames[(-1, 0)][0][:6] == BCAST  # the uplink got A's broadcast ...
    assert [fr[:6] for fr in batched.frames[(-1, 0)]].count(T) == 3  # ... and its unicast
    assert batched.counters["p1"][2][(0, "rx")][2] == 8  # B's queue 0 dropped 20 - 4 - 8
    assert batched.counters["switch"][2] == 2  # A <-> A2, both behind A


async def _two_ports(h: Harness) -> None:
    """Unicast after learning, into two RX queues of B; B's queue 0 fills up."""
    fa, fb = h.fes
    f = Numbered()
    fa.post_rx(0, 32)
    fb.post_rx(0, 40)
    fb.post_rx(2, 64)
    await fb.send_frames(1, [f(A, B)])  # unknown: flooded to A; B learnt
    await fa.send_frames(1, [f(B, A) for _ in range(30)] + [f(B, A2) for _ in range(30)])
    await fa.send_frames(1, [f(B, A) for _ in range(30)])  # 10 fit, 20 wait
    await until(lambda: h.ports[1].stats.queue(0).packets == 40, timeout=10)
    fb.post_rx(0, 64)


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "no_mrg"])
@pytest.mark.trio
async def test_two_switch_ports_batched_equals_per_frame(mrg: bool) -> None:
    features = DEFAULT_NET_FEATURES if mrg else DEFAULT_NET_FEATURES & ~VirtioFeature.NET_MRG_RXBUF
    guests = [{}, {"qp": 2, "features": features}]
    batched, sizes = await run_switch(True, guests, _two_ports)
    per_frame, none = await run_switch(False, guests, _two_ports)
    assert batched.frames == per_frame.frames
    assert batched.counters == per_frame.counters
    assert none == []
    b0 = batched.frames[(1, 0)]
    assert len(b0) == 60 and len(batched.frames[(1, 2)]) == 30
    assert batched.counters["p1"][2][(0, "rx")][2] == 0
    # Without misses or a backlog each ring takes its frames of a burst in C at once: B's
    # flood to A, then 30 and 30 on B's two rings, then 10 before the ring ran out.
    assert sizes[:4] == [1, 30, 30, 10]


def test_mac_runs_end_where_either_mac_changes() -> None:
    body = bytes(50)
    frames = [B + A + body, B + A + bytes([1]) * 50, B + A2 + body, C + A2 + body]
    frames += [C + A2[:4], C + A2 + body, C + A2 + body]
    burst, keep = fastpath.FrameBurst.of(frames)
    assert [burst.mac_run(i) for i in range(len(frames))] == [2, 2, 3, 4, 5, 7, 7]
    assert burst.macs(0) == B + A and burst.macs(3) == C + A2
    assert burst.macs(4) == C + A2[:4]  # too short for a source MAC: the per-frame path decides
    del keep
