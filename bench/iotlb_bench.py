"""Micro-benchmark of IoTlb.translate: does the lookup cost grow with the entry count?

DPDK's IOTLB once scanned its entries linearly and a guest fell from >10 Mpps to
<0.07 Mpps as stale entries piled up. This prints the cost of a random lookup
(each one lands in a different entry, so the last-hit cache does not help) with
16 and with 65,536 live entries, and the ratio (target: <= 1.5).

Run: .venv/bin/python bench/iotlb_bench.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.enums import IotlbPerm
from vhostd.iotlb import IoTlb

PAGE = 0x1000
LOOKUPS = 200_000
REPEATS = 7


def build(entries: int, rng: random.Random) -> tuple[IoTlb, list[int]]:
    """A TLB with `entries` scattered one-page mappings, inserted in random order."""
    tlb = IoTlb(capacity=max(entries, 1))
    pages = rng.sample(range(entries * 16), entries)
    for page in pages:
        tlb.update(page * PAGE, PAGE, 0x7F00_0000_0000 + page * PAGE, IotlbPerm.RW)
    assert len(tlb) == entries
    return tlb, pages


def time_translate(entries: int, hot: int | None = None, seed: int = 1) -> float:
    """Best-of-REPEATS ns per translate of a random 1500-byte buffer in a random entry.

    With `hot`, lookups go to `hot` of the live entries only (a ring's buffers
    among many stale mappings: the DPDK case); otherwise to all of them.
    """
    rng = random.Random(seed)
    tlb, pages = build(entries, rng)
    targets = pages if hot is None else rng.sample(pages, hot)
    queries = [rng.choice(targets) * PAGE + rng.randrange(PAGE - 1500) for _ in range(LOOKUPS)]
    translate = tlb.translate
    read = IotlbPerm.READ
    best = float("inf")
    for _ in range(REPEATS):
        begin = time.perf_counter_ns()
        for iova in queries:
            translate(iova, 1500, read)
        best = min(best, (time.perf_counter_ns() - begin) / LOOKUPS)
    return best


def time_dict_floor(entries: int, seed: int = 1) -> float:
    """Best-of-REPEATS ns per plain dict lookup of a random live page: the memory floor.

    No translation at all, only what any per-entry Python structure pays to
    reach a random one of ``entries`` objects; its 65,536 / 16 ratio is what
    the machine's caches allow, whatever the lookup's algorithm.
    """
    rng = random.Random(seed)
    pages = rng.sample(range(entries * 16), entries)
    table = {page: (page * PAGE, (page + 1) * PAGE, page * PAGE) for page in pages}
    queries = [rng.choice(pages) * PAGE + rng.randrange(PAGE) for _ in range(LOOKUPS)]
    get = table.get
    best = float("inf")
    for _ in range(REPEATS):
        begin = time.perf_counter_ns()
        for iova in queries:
            start, _, uaddr = get(iova >> 12, _MISSING)
            uaddr + (iova - start)
        best = min(best, (time.perf_counter_ns() - begin) / LOOKUPS)
    return best


_MISSING = (0, 0, 0)


def main() -> None:
    small = time_translate(16)
    large = time_translate(65_536)
    print(f"translate, 16 live entries:     {small:7.0f} ns/op")
    print(f"translate, 65,536 live entries: {large:7.0f} ns/op")
    print(f"ratio 65,536 / 16:              {large / small:7.2f}x (target <= 1.5x)")
    hot = time_translate(65_536, hot=256)
    print(f"translate, 65,536 live, 256 hot: {hot:6.0f} ns/op")
    print(f"ratio 65,536 (256 hot) / 16:    {hot / small:7.2f}x")
    floor16, floor64k = time_dict_floor(16), time_dict_floor(65_536)
    print(
        f"plain dict lookup, 16 vs 65,536 keys: {floor16:.0f} vs {floor64k:.0f} ns/op "
        f"({floor64k / floor16:.2f}x: this machine's floor for random lookups)"
    )


if __name__ == "__main__":
    main()
