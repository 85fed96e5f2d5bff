"""What the device IOTLB costs a sink port when every lookup hits: on vs off.

DPDK's virtio-user cannot negotiate ACCESS_PLATFORM, so nothing here comes
from a real peer. Two measurements, each as pairs of short windows run back
to back (off, then on) and reported as the median of the per-pair ratios,
which a shared machine's drifting load moves far less than any one window:

- the burst loop alone: a ring of 256 posted 64-byte frames re-offered round
  after round (bench/fastpath_bench.py), FastTxQueue over guest memory with
  the IOTLB off, or on with one 4 KiB entry per page (what intel-iommu
  answers), timed in CPU seconds;
- the whole daemon in-process against the front-end simulator (tests/vusim):
  it posts a full TX ring of one-buffer chains, each buffer mapped once, and
  re-offers the same chains round after round (kicking when the event index
  asks); a warm-up answers every MISS, so the measured window hits on every
  lookup (the report says how many misses it saw: 0 expected). Reported:
  packets per second and the time vhostd spends in its TX bursts per packet.

Run: .venv/bin/python bench/iotlb_pps.py [--pairs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench import fastpath_bench
from tests.daemon import port_config, serving
from tests.vusim.frontend import Frontend
from tests.vusim.rings import Buffer
from vhostd import net, session

FRAME = bytes(range(64))


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
            # A full TX ring of one-buffer chains, each buffer mapped once, then
            # re-offered whole round after round: the front-end costs a few
            # stores per packet, so the window is mostly the daemon's own work.
            ring = fe.vrings[1].ring
            frame = bytes(12) + FRAME
            heads = []
            for _ in range(ring.size):
                gpa = fe.ram.alloc(len(frame), 64)
                fe.ram.write(gpa, frame)
                heads.append(ring.add_chain([Buffer(gpa, len(frame))]))

            async def offer() -> None:
                old = ring.avail_idx
                ring.push_heads(heads)
                if ring.needs_kick(old):
                    fe.kick(1)
                target = ring.avail_idx
                while ring.used_idx() != target:
                    await trio.lowlevel.checkpoint()

            for _ in range(4):  # warm-up: misses answered, translations cached
                await offer()
            stats = daemon.ports[sock.stem].stats
            tlb = stats.iotlb
            lookups0, misses0 = tlb.lookups, tlb.misses
            sent = 0
            with BurstTimer() as timer:
                begin = time.perf_counter()
                while time.perf_counter() - begin < seconds:
                    await offer()
                    sent += len(heads)
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


@dataclass(frozen=True, slots=True)
class Comparison:
    """Pairs of (off, on) samples of a cost per packet, and the median on/off ratio."""

    off: list[float]
    on: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(b / a for a, b in zip(self.off, self.on, strict=True))

    @property
    def best_ratio(self) -> float:
        """Fastest window against fastest window: other load only ever adds time."""
        return min(self.on) / min(self.off)


def burst_loop(pairs: int, seconds: float) -> Comparison:
    """Nanoseconds of CPU per packet in the C burst loop, IOTLB off vs on (all hits)."""
    off: list[float] = []
    on: list[float] = []
    for _ in range(pairs):
        for iommu, out in ((False, off), (True, on)):
            pps = fastpath_bench.run("sink", True, iommu, seconds, time.process_time)
            out.append(1e9 / pps)
    return Comparison(off, on)


def daemon(pairs: int, seconds: float) -> tuple[Comparison, list[IotlbRun]]:
    """Microseconds per packet in the daemon's TX bursts, IOTLB off vs on (all hits)."""
    runs = [measure(iommu, seconds) for _ in range(pairs) for iommu in (False, True)]
    times = [r.device_us_per_packet for r in runs]
    return Comparison(times[0::2], times[1::2]), runs


def report(pairs: int, seconds: float) -> None:
    loop = burst_loop(pairs * 4, seconds / 8)
    print(
        f"C burst loop, sink, 64 B: IOTLB off {statistics.median(loop.off):.1f} ns/packet, "
        f"on (all hits) {statistics.median(loop.on):.1f} ns/packet; "
        f"on/off {loop.ratio:.3f} (median of {len(loop.off)} pairs)"
    )
    whole, runs = daemon(pairs, seconds)
    misses = sum(r.misses for r in runs if r.iommu)
    lookups = sum(r.lookups for r in runs if r.iommu)
    print(
        f"daemon + simulator, sink port, us/packet in vhostd's TX bursts: IOTLB off "
        f"{min(whole.off):.3f} best / {statistics.median(whole.off):.3f} median, on (all hits) "
        f"{min(whole.on):.3f} / {statistics.median(whole.on):.3f}; on/off {whole.best_ratio:.3f} "
        f"best of {pairs} windows each, {whole.ratio:.3f} median of pairs ({lookups} slow-path "
        f"lookups, {misses} misses with it on)"
    )
    rate = {on: max(r.pps for r in runs if r.iommu is on) / 1e6 for on in (False, True)}
    print(
        f"daemon + simulator, sink port, best window: IOTLB off {rate[False]:.3f} Mpps, "
        f"on (all hits) {rate[True]:.3f} Mpps ({rate[True] / rate[False]:.3f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    report(args.pairs, args.seconds)


if __name__ == "__main__":
    main()
