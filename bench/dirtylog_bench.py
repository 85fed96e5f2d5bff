"""What live migration's dirty log costs the data path: logging on vs off.

DPDK's virtio-user never starts dirty logging (it sends no SET_LOG_BASE), so
no real peer can drive this; like the IOTLB cases, it runs the C burst loops
in-process over guest memory (bench/fastpath_bench.py: a ring of 256 posted
64-byte frames re-offered round after round), as pairs of windows run back
to back (off, then on), in CPU seconds, reported as the median of the
per-pair ratios. "sink" logs the used ring only (TX buffers are read, not
written); "switch" sends A's TX bursts through the switch into B's RX ring
(bench/switch_bench.py, C batches), logging every RX header and payload too.

Run: .venv/bin/python bench/dirtylog_bench.py [--pairs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fastpath_bench, switch_bench


def _run(case: str, seconds: float, log: bool) -> float:
    if case == "sink":
        return fastpath_bench.run("sink", True, False, seconds, time.process_time, log=log)
    return switch_bench.run(True, seconds, log=log)


def pairs(case: str, n: int, seconds: float) -> tuple[float, float, float]:
    """(median pps off, median pps on, median of on/off ratios)."""
    offs, ons, ratios = [], [], []
    for _ in range(n):
        off = _run(case, seconds, False)
        on = _run(case, seconds, True)
        offs.append(off)
        ons.append(on)
        ratios.append(on / off)
    return statistics.median(offs), statistics.median(ons), statistics.median(ratios)


def report(n: int = 10, seconds: float = 0.5) -> None:
    print(f"dirty log (C burst loop, CPU time, median of {n} pairs)")
    print(f"  {'case':8} {'off':>12} {'on':>12} {'on/off':>7}")
    for case in ("sink", "switch"):
        off, on, ratio = pairs(case, n, seconds)
        print(f"  {case:8} {off / 1e6:7.2f} Mpps {on / 1e6:7.2f} Mpps {ratio:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    report(args.pairs, args.seconds)


if __name__ == "__main__":
    main()
