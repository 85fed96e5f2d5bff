"""Packets per second through one sink port with the device IOTLB on (all hits) vs off.

DPDK's virtio-user cannot negotiate ACCESS_PLATFORM, so this runs the daemon
in-process against the front-end simulator (tests/vusim). With the IOTLB on,
every buffer address is an IOVA; the simulator maps each buffer once and keeps
reusing it, and a warm-up pass answers every MISS, so the measured pass hits on
every lookup (the report says how many misses it saw: 0 expected). The
simulator runs in the same process and thread, so the absolute numbers include
its cost; compare the two rows, not with DPDK.

Run: .venv/bin/python bench/iotlb_pps.py [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from protocol import IotlbPerm
from tests.daemon import port_config, serving
from tests.vusim.dma import Dma
from tests.vusim.frontend import Frontend
from vhostd import net, session

FRAME = bytes(range(64))
BATCH = 128


@dataclass(slots=True)
class ReusingDma:
    """Maps each (gpa, size, perm) once and hands out the same IOVA again.

    The simulator's RAM allocator returns the same buffers batch after batch,
    so after one pass every address the device sees is already in its IOTLB.
    """

    inner: Dma
    cache: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def map_buffer(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        key = (gpa, size, int(perm))
        addr = self.cache.get(key)
        if addr is None:
            addr = self.cache[key] = self.inner.map_buffer(gpa, size, perm)
        return addr

    def unmap_buffer(self, addr: int, size: int) -> None:
        pass

    def ring_addr(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        return self.inner.ring_addr(gpa, size, perm)


@dataclass(frozen=True, slots=True)
class IotlbRun:
    iommu: bool
    packets: int
    seconds: float
    lookups: int
    misses: int
    device_seconds: float  # inside vhostd's TX bursts only

    @property
    def device_us_per_packet(self) -> float:
        return self.device_seconds / self.packets * 1e6

    @property
    def pps(self) -> float:
        return self.packets / self.seconds


class BurstTimer:
    """Wraps the sessions' TxQueue.burst to add up the time the device spends in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cls: type[net.TxQueue] = getattr(session, "TxQueue")  # noqa: B009 - vhostd.fastpath's, or net's with VHOSTD_FASTPATH=0
        self.original = self.cls.burst

    def __enter__(self) -> BurstTimer:
        original = self.original

        def timed(q: net.TxQueue, sink: net.Sink | None, limit: int = net.BURST) -> int:
            begin = time.perf_counter()
            try:
                return int(original(q, sink, limit))
            finally:
                self.seconds += time.perf_counter() - begin

        self.cls.burst = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.burst = self.original  # type: ignore[method-assign]


async def _measure(iommu: bool, seconds: float) -> IotlbRun:
    with tempfile.TemporaryDirectory(prefix="vhd-iotlb-") as tmp:
        sock = Path(tmp) / "iotlb.sock"
        async with (
            serving(port_config(sock, "sink", iommu=iommu)) as daemon,
            Frontend.connect(str(sock)) as fe,
        ):
            await fe.net_setup(queue_pairs=1, iommu=iommu)
            if iommu:
                ring = fe.vrings[1].ring
                ring.dma = ReusingDma(ring.dma)
            frames = [FRAME] * BATCH
            for _ in range(4):  # warm-up: misses answered, views cached
                await fe.send_frames(1, frames)
            stats = daemon.ports[sock.stem].stats
            tlb = stats.iotlb
            lookups0, misses0 = tlb.lookups, tlb.misses
            sent = 0
            with BurstTimer() as timer:
                begin = time.perf_counter()
                while time.perf_counter() - begin < seconds:
                    done = await fe.send_frames(1, frames)
                    sent += len(done)
                elapsed = time.perf_counter() - begin
            assert stats.totals("tx").packets >= sent
            return IotlbRun(
                iommu,
                sent,
                elapsed,
                tlb.lookups - lookups0,
                tlb.misses - misses0,
                timer.seconds,
            )


def measure(iommu: bool, seconds: float) -> IotlbRun:
    return trio.run(_measure, iommu, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    off = measure(False, args.seconds)
    on = measure(True, args.seconds)
    for run in (off, on):
        print(
            f"iommu {'on ' if run.iommu else 'off'}: {run.pps / 1e3:8.1f} kpps end to end, "
            f"{run.device_us_per_packet:6.2f} us/packet in vhostd's TX burst "
            f"({run.packets} frames, {run.lookups} IOTLB lookups, {run.misses} misses)"
        )
    print(
        f"on/off: {on.pps / off.pps:.2f} (pps), "
        f"{on.device_us_per_packet / off.device_us_per_packet:.2f} (device time per packet)"
    )


if __name__ == "__main__":
    main()
