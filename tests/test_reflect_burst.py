"""Reflect mode hands whole TX bursts to the RX ring in C (``Port._reflect_burst``).

What the guest sees must be what the per-frame path gives it: every frame,
MACs swapped, in order, even when the RX ring runs out mid-burst and the rest
waits in the backlog until the driver posts more buffers.
"""

from __future__ import annotations

import pytest

from tests.probe import count_batches, frame, ports
from tests.vusim.frontend import Frontend
from vhostd import fastpath


@pytest.mark.parametrize("iommu", [False, True], ids=["iommu_off", "iommu_on"])
@pytest.mark.trio
async def test_reflect_burst_runs_out_of_rx_buffers_and_resumes(
    iommu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fastpath.ENABLED:
        pytest.skip("VHOSTD_FASTPATH=0: the batch path is not in use")
    batches = count_batches(monkeypatch)
    frames = [frame(i, 60 + i) for i in range(40)]
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(iommu=iommu)
        fe.post_rx(0, 16)
        assert len(await fe.send_frames(1, frames)) == 40
        got = await fe.recv_frames(0, count=16, timeout=5)
        fe.post_rx(0, 64)
        got += await fe.recv_frames(0, count=24, timeout=5)
        assert [(g[:6], g[6:12], g[12:]) for g in got] == [(f[6:12], f[:6], f[12:]) for f in frames]
        rx = port.stats.queue(0)
        assert (rx.packets, rx.bytes, rx.dropped) == (40, sum(len(f) for f in frames), 0)
        # Without the IOTLB the first 16 go through one batch call; with it the
        # first buffers miss, so the batch stops and the frames wait for the UPDATE.
        assert sum(batches) >= (0 if iommu else 16) and batches
        assert port.stats.queue_faults.total() == 0


@pytest.mark.trio
async def test_reflect_burst_with_two_rx_queues_keeps_each_queue_in_order() -> None:
    """Frames pick their RX queue by MAC hash, as one at a time; one queue runs out."""
    frames = [frame(i, 60, src=1 + i % 3) for i in range(60)]  # dst ^ src odd/even mixed
    first = [f for f in frames if (f[5] ^ f[11]) % 2 == 0]
    second = [f for f in frames if (f[5] ^ f[11]) % 2 == 1]
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(queue_pairs=2)
        fe.post_rx(0, 8)
        fe.post_rx(2, 64)
        assert len(await fe.send_frames(1, frames)) == 60
        got0 = await fe.recv_frames(0, count=8, timeout=5)
        got2 = await fe.recv_frames(2, count=len(second), timeout=5)
        fe.post_rx(0, 64)
        got0 += await fe.recv_frames(0, count=len(first) - 8, timeout=5)
        for got, sent in ((got0, first), (got2, second)):
            assert [(g[:6], g[6:12], g[12:]) for g in got] == [
                (f[6:12], f[:6], f[12:]) for f in sent
            ]
        assert port.stats.queue(0).packets == len(first)
        assert port.stats.queue(2).packets == len(second)
        assert port.stats.queue(0).dropped == port.stats.queue(2).dropped == 0
