"""Source mode: vhostd fills the guest's posted RX buffers with one template frame.

Both delivery paths run in one process: the session's ``RxQueue`` is swapped
for the pure-Python reference or the C one per test, whatever VHOSTD_FASTPATH
says. A source ring must fill exactly what was posted, then sleep until a kick:
"does not spin" is checked on the fill calls and on this thread's CPU time
(the daemon runs in the test's trio loop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import trio

from protocol import VirtioFeature
from tests.probe import count_batches, ports, session, until
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.net import recv_frames
from tests.vusim.rings import Buffer
from tests.vusim.viommu import MissMode
from vhostd import fastpath, net
from vhostd.native import ffi
from vhostd.port import Port
from vhostd.source import SourceRing, template

VF = VirtioFeature
EVENT_IDX = DEFAULT_NET_FEATURES | VF.RING_EVENT_IDX
NO_MRG = EVENT_IDX & ~VF.NET_MRG_RXBUF


@pytest.fixture(params=["python", "c"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which RxQueue sessions build (set before the daemon starts its rings)."""
    rx = net.RxQueue if request.param == "python" else fastpath.FastRxQueue
    monkeypatch.setattr("vhostd.session.RxQueue", rx)
    return str(request.param)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many frames each C ``deliver_batch`` call handled."""
    yield count_batches(monkeypatch)


@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """What each ``SourceRing.fill`` call returned, in order (-1: it raised, e.g. a miss)."""
    calls: list[int] = []
    real = SourceRing.fill

    def spy(self: SourceRing) -> int:
        done = -1
        try:
            done = real(self)
        finally:
            calls.append(done)
        return done

    monkeypatch.setattr(SourceRing, "fill", spy)
    yield calls


def test_template() -> None:
    frame = template(64)
    assert len(frame) == 64
    assert frame[:6] == bytes.fromhex("020000000002")
    assert frame[6:12] == bytes.fromhex("020000000001")
    assert frame[12:14] == b"\x88\xb5"
    assert frame[14:] == bytes(range(50))
    assert template(1518)[14:] == bytes(i & 0xFF for i in range(1504))


async def assert_idle(port: Port, fills: list[int], seconds: float = 0.3) -> None:
    """No fill call, no counter change and (almost) no CPU over ``seconds``."""
    await trio.sleep(0.05)  # a round in flight finishes
    calls, rx = len(fills), port.stats.totals("rx")
    cpu = time.thread_time()
    await trio.sleep(seconds)
    spent = time.thread_time() - cpu
    assert len(fills) == calls, fills[calls:][:20]
    after = port.stats.totals("rx")
    assert (after.packets, after.bytes, after.dropped) == (rx.packets, rx.bytes, rx.dropped)
    assert spent < seconds / 3, f"{spent:.3f} s of CPU while idle"


CASES = {
    "mrg-1qp-64": (EVENT_IDX, 1, False, 64),
    "mrg-1qp-1518": (EVENT_IDX, 1, False, 1518),
    "nomrg-1qp-64": (NO_MRG, 1, False, 64),
    "nomrg-1qp-1518": (NO_MRG, 1, False, 1518),
    "mrg-2qp-64": (EVENT_IDX, 2, False, 64),
    "nomrg-2qp-1518": (NO_MRG, 2, False, 1518),
    "mrg-iommu-1518": (EVENT_IDX, 1, True, 1518),
    "nomrg-iommu-64": (NO_MRG, 1, True, 64),
}


@pytest.mark.parametrize(("features", "qp", "iommu", "size"), CASES.values(), ids=CASES.keys())
@pytest.mark.trio
async def test_source_fills_exactly_the_posted_buffers(
    path: str,
    fills: list[int],
    batches: list[int],
    features: int,
    qp: int,
    iommu: bool,
    size: int,
) -> None:
    mrg = bool(features & VF.NET_MRG_RXBUF)
    buf = 512 if mrg else 2048  # mergeable: a 1518-byte frame spans four buffers
    per_frame = -(-(12 + size) // buf)
    frame = template(size)
    async with (
        ports("source", source_frame_size=size) as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=qp, iommu=iommu, features=features)
        rxqs = [2 * i for i in range(qp)]
        await assert_idle(port, fills, 0.05)  # no buffers yet: nothing written
        counts = {q: 20 + 7 * n for n, q in enumerate(rxqs)}
        for q in rxqs:
            fe.post_rx(q, counts[q] * per_frame, buf)
        for q in rxqs:
            got = await recv_frames(fe, q, 5.0, count=counts[q], refill=False)
            assert len(got) == counts[q]
            assert all(g == frame for g in got), (len(got[0]), got[0][:20])
        await assert_idle(port, fills, 0.15)
        for q in rxqs:
            stats = port.stats.queue(q)
            assert (stats.packets, stats.bytes, stats.dropped) == (
                counts[q],
                counts[q] * size,
                0,
            )
            # One interrupt decision per fill call (a miss ends one), not per frame.
            assert 1 <= stats.interrupts + stats.suppressed <= len(fills)
            if not iommu:
                assert stats.interrupts + stats.suppressed < counts[q]
            assert fe.vrings[q].ring.collect_used() == []  # nothing beyond what was read
        assert port.stats.queue_faults.total() == 0
        if iommu:
            assert port.stats.iotlb_miss_sent > 0  # the buffers were translated on demand
        if path == "python":
            assert batches == []
        elif not iommu:
            assert sum(batches) == sum(counts.values())  # every frame went through C batches
        # The ring slept on its kick fd: posting more wakes it.
        fe.post_rx(0, 3 * per_frame, buf)
        got = await recv_frames(fe, 0, 5.0, count=3, refill=False)
        assert got == [frame] * 3
        assert port.stats.queue(0).packets == counts[0] + 3


@pytest.mark.trio
async def test_idle_source_port_does_not_spin(path: str, fills: list[int]) -> None:
    """Connected, rings started and enabled, no buffer ever posted: nothing runs."""
    async with (
        ports("source") as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=2, features=EVENT_IDX)
        await until(lambda: all(v.started for v in session(port).vrings[:4]))
        await assert_idle(port, fills, 0.5)
        assert len(fills) <= 4 and not any(fills), fills
        assert port.stats.totals("rx").packets == 0


@pytest.mark.trio
async def test_buffer_too_small_without_mrg_is_dropped_without_spinning(
    path: str, fills: list[int]
) -> None:
    """A posted buffer shorter than the frame: counted as a drop, then the ring waits."""
    async with (
        ports("source", source_frame_size=1000) as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup(features=NO_MRG)
        fe.post_rx(0, 4, 256)
        await until(lambda: port.stats.queue(0).dropped > 0)
        await assert_idle(port, fills)
        assert port.stats.queue(0).packets == 0
        assert port.stats.queue_faults.total() == 0


@pytest.mark.trio
async def test_disabled_ring_is_not_filled(path: str, fills: list[int]) -> None:
    """Started but disabled: buffers stay untouched until SET_VRING_ENABLE."""
    async with (
        ports("source") as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup(features=EVENT_IDX)
        await fe.set_vring_enable(0, False)
        fe.post_rx(0, 8)
        await assert_idle(port, fills)
        assert port.stats.queue(0).packets == 0
        await fe.set_vring_enable(0, True)
        got = await recv_frames(fe, 0, 5.0, count=8, refill=False)
        assert got == [template(64)] * 8


@pytest.mark.trio
async def test_guest_tx_on_a_source_port_is_counted_and_dropped(path: str) -> None:
    async with (
        ports("source") as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup()
        done = await fe.send_frames(1, [bytes(60)] * 10)
        assert len(done) == 10
        tx = port.stats.queue(1)
        assert (tx.packets, tx.bytes) == (10, 600)
        assert port.stats.queue(0).packets == 0  # nothing reflected: no buffers, no frames


def test_one_template_burst_per_ring() -> None:
    """The C batch's BURST entries all point at one copy of the template."""

    class FastLike:
        def deliver_batch(self, *args: object, **kwargs: object) -> int:
            return 0

    ring = SourceRing(template(64), FastLike())  # type: ignore[arg-type]
    burst = ring._burst
    assert burst is not None and len(burst) == net.BURST
    addresses = {int(ffi.cast("uintptr_t", burst.frames[i].ptr)) for i in range(net.BURST)}
    assert addresses == {int(ffi.cast("uintptr_t", ring._keep))}
    assert bytes(burst.view(net.BURST - 1)) == template(64)


def post_pages(fe: Frontend, q: int, n: int) -> None:
    """``n`` one-page RX buffers on pages of their own (a MISS names one queue's pages)."""
    ring = fe.vrings[q].ring
    for _ in range(n):
        ring.post([Buffer(fe.ram.alloc(4096, 4096), 4096, writable=True)])
    fe.kick(q)


@pytest.mark.trio
async def test_unanswered_miss_parks_only_its_queue(path: str) -> None:
    """Queue 2's MISS goes unanswered; queue 0 keeps filling; the late UPDATE resumes 2."""
    frame = template(64)
    async with (
        ports("source") as (_, (port,)),
        Frontend.connect(port.config.socket) as fe,
    ):
        await fe.net_setup(queue_pairs=2, iommu=True, features=EVENT_IDX)
        await until(lambda: all(v.started for v in session(port).vrings[:4]))
        sent, before = port.stats.iotlb_miss_sent, len(fe.viommu.misses())
        fe.viommu.policy.mode = MissMode.NEVER
        post_pages(fe, 2, 4)
        await until(lambda: port.stats.iotlb_miss_sent > sent)
        parked = fe.viommu.misses()[before:]
        fe.viommu.policy.mode = MissMode.ANSWER
        post_pages(fe, 0, 6)
        assert await recv_frames(fe, 0, 5.0, count=6, refill=False) == [frame] * 6
        assert port.stats.queue(2).packets == 0
        for miss in parked:
            update = fe.viommu.answer_miss(miss.iova, miss.perm)
            assert update is not None
            await fe.iotlb_msg(update)
        assert await recv_frames(fe, 2, 5.0, count=4, refill=False) == [frame] * 4
        assert port.stats.queue_faults.total() == 0
        assert port.stats.iotlb_miss_timeouts == 0
