"""The simulator against a real back-end: DPDK testpmd with net_vhost.

vhostd is not ready yet, so these prove the simulator itself speaks
vhost-user well enough for a production back-end, and record what DPDK
does with a device IOTLB (its MISS sequence) for comparison.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from protocol import IotlbType, VirtioFeature
from tests.lab.dpdk import Testpmd, VhostBackend
from tests.vusim.frontend import Frontend

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd missing"),
]

LCORES = "0@(0,1),1@0"


def _frame(i: int, size: int = 64) -> bytes:
    dst = b"\x02\x00\x00\x00\x00\x01"
    src = b"\x02\x00\x00\x00\x00\x02"
    body = i.to_bytes(4, "big") * (size // 4)
    return (dst + src + b"\x08\x00" + body)[:size]


def _run(
    tmp_path: Path,
    mode: str,
    iommu: bool,
    body: Callable[[Frontend, Testpmd], Awaitable[None]],
) -> Testpmd:
    sock = tmp_path / "vhost.sock"
    pmd = Testpmd(
        [VhostBackend(sock, iommu_support=iommu)],
        tmp_path,
        forward_mode=mode,
        lcores=LCORES,
        name=f"testpmd-{mode}",
        txpkts=64 if mode == "txonly" else None,
    )

    async def main() -> None:
        async with Frontend.connect(str(sock), timeout=10.0) as fe:
            await fe.net_setup(iommu=iommu)
            await trio.to_thread.run_sync(pmd.wait_link_up)
            await body(fe, pmd)

    with pmd:
        trio.run(main)
    return pmd


def test_tx_counted_by_dpdk_rxonly(tmp_path: Path) -> None:
    async def body(fe: Frontend, pmd: Testpmd) -> None:
        fe.ram.arm_canary()
        await trio.to_thread.run_sync(pmd.start_forwarding)
        done = await fe.send_frames(1, [_frame(i) for i in range(100)])
        assert len(done) == 100
        assert all(c.chain is not None for c in done)
        stats = await trio.to_thread.run_sync(pmd.port_stats)
        assert stats[0].rx_packets == 100
        assert stats[0].rx_bytes == 100 * 64
        assert fe.ram.canary_violations() == []

    _run(tmp_path, "rxonly", False, body)


def test_dpdk_txonly_reaches_rx(tmp_path: Path) -> None:
    async def body(fe: Frontend, pmd: Testpmd) -> None:
        fe.post_rx(0, 128)
        await trio.to_thread.run_sync(pmd.start_forwarding)
        frames = await fe.recv_frames(0, timeout=5.0, count=200)
        await trio.to_thread.run_sync(pmd.stop_forwarding)
        assert len(frames) >= 200
        assert all(len(f) == 64 for f in frames)
        stats = await trio.to_thread.run_sync(pmd.port_stats)
        assert stats[0].tx_packets >= len(frames)

    _run(tmp_path, "txonly", False, body)


def test_iommu_miss_answered_and_traffic_flows(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    async def body(fe: Frontend, pmd: Testpmd) -> None:
        assert fe.features & VirtioFeature.ACCESS_PLATFORM
        fe.ram.arm_canary()
        await trio.to_thread.run_sync(pmd.start_forwarding)
        done = await fe.send_frames(1, [_frame(i) for i in range(50)], timeout=10.0)
        assert len(done) == 50
        with trio.move_on_after(5):
            while (await trio.to_thread.run_sync(pmd.port_stats))[0].rx_packets < 50:
                await trio.sleep(0.2)
        stats = await trio.to_thread.run_sync(pmd.port_stats)
        seen["rx"] = stats[0].rx_packets
        seen["log"] = list(fe.log)
        misses = fe.viommu.misses()
        assert misses, "DPDK never sent a MISS"
        updates = fe.viommu.sent(IotlbType.UPDATE)
        assert updates and all(e.ack == 0 for e in updates)
        # Every ring address missed at least once before traffic flowed.
        ring = fe.vrings[1].ring
        missed_pages = {m.iova & ~0xFFF for m in misses}
        assert ring.desc_addr & ~0xFFF in missed_pages
        assert fe.ram.canary_violations() == []

    _run(tmp_path, "rxonly", True, body)
    # DPDK 22.11's net_vhost drops the packet whose buffer missed in the IOTLB
    # (e2e-lab.md): every frame was consumed, all but such a one are counted.
    assert 45 <= seen["rx"] <= 50  # type: ignore[operator]
    for where, msg in seen["log"][:60]:  # type: ignore[index]
        print(f"{where:16} {msg.code.name:22} flags={int(msg.flags):#x} {msg.payload}")
