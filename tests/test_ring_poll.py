"""A switch or reflect port's TX ring polls on briefly after moving frames.

Frames the front-end posts within ``rings.POLL_SECONDS`` of the last burst
are taken without a kick (the ring did not ask for one: with the event index
the driver sees no kick is wanted); after that the ring asks for kicks and
sleeps. Without the budget every burst after the first cost a kick and a
wake-up, and two ports bouncing frames settled into taking turns on one lump
of frames (README, "Performance").
"""

from __future__ import annotations

import pytest
import trio

from tests.probe import frame, ports, until
from tests.vusim.frontend import Frontend
from vhostd import rings


async def _kicks_for_two_bursts(mode: str, gap: float) -> tuple[int, int]:
    async with ports(mode) as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(iommu=False)
        fe.post_rx(0, 64)
        assert len(await fe.send_frames(1, [frame(i) for i in range(8)])) == 8
        first = port.stats.queue(1).kicks
        await trio.sleep(gap)
        assert len(await fe.send_frames(1, [frame(i) for i in range(8, 16)])) == 8
        return first, port.stats.queue(1).kicks


@pytest.mark.parametrize("mode", ["reflect", "switch"])
@pytest.mark.trio
async def test_a_burst_soon_after_the_last_needs_no_kick(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rings, "POLL_SECONDS", 5.0)
    first, second = await _kicks_for_two_bursts(mode, 0.0)
    assert first >= 1
    assert second == first  # taken while polling: the driver was not asked to kick


@pytest.mark.trio
async def test_after_the_budget_the_ring_sleeps_until_kicked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rings, "POLL_SECONDS", 0.01)
    first, second = await _kicks_for_two_bursts("reflect", 0.3)
    assert second == first + 1


@pytest.mark.trio
async def test_a_sink_port_does_not_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing it takes goes anywhere: no one waits for its frames, no budget spent."""
    monkeypatch.setattr(rings, "POLL_SECONDS", 5.0)
    first, second = await _kicks_for_two_bursts("sink", 0.0)
    assert second == first + 1


@pytest.mark.trio
async def test_an_rx_ring_with_nothing_waiting_asks_for_no_kicks() -> None:
    """Refills of an RX ring no frame waits for cost the driver no kick (and vhostd no
    wake-up); once frames wait for buffers, posting buffers kicks and delivers them."""
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(iommu=False)
        fe.post_rx(0, 4)
        await trio.sleep(0.05)
        kicks = port.stats.queue(0).kicks
        for _ in range(5):
            fe.post_rx(0, 4)
            await trio.sleep(0.01)
        assert port.stats.queue(0).kicks == kicks
        # 24 buffers posted; 30 frames: 6 wait, and the next refill's kick delivers them.
        assert len(await fe.send_frames(1, [frame(i) for i in range(30)])) == 30
        await until(lambda: port.stats.queue(0).packets == 24)
        fe.post_rx(0, 8)
        await until(lambda: port.stats.queue(0).packets == 30)
        assert port.stats.queue(0).kicks > kicks
