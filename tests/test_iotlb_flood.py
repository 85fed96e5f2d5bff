"""A flood of UPDATEs: the IOTLB stays at its cap and the process's memory stays flat.

The issue this closes: 870,000 UPDATEs of distinct pages grew RSS from 35 to
97 MiB. Here 1,000,000 go into one IoTlb at the default capacity, in process
(no socket: what is measured is the table, not message handling), with a page
the guest keeps using in between: LRU must keep it where FIFO would not.
"""

from __future__ import annotations

import gc
import os
import time

from protocol.enums import IotlbPerm
from vhostd.iotlb import DEFAULT_CAPACITY, IoTlb

PAGE = 0x1000
FLOOD = 1_000_000
RSS_SLACK = 4 << 20
HOT = 1 << 40  # an IOVA far from the flood's
USER_BASE = 0x7F00_0000_0000


def rss_bytes() -> int:
    """Resident set size, from /proc/self/statm (second field, in pages)."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


def test_update_flood_keeps_the_iotlb_at_its_cap_and_rss_flat() -> None:
    tlb = IoTlb()
    capacity = tlb.capacity
    assert capacity == DEFAULT_CAPACITY
    update, translate, rw, read = tlb.update, tlb.translate, IotlbPerm.RW, IotlbPerm.READ
    update(HOT, PAGE, USER_BASE, rw)

    def flood(pages: range) -> None:
        for page in pages:
            update(page * PAGE, PAGE, USER_BASE + page * PAGE, rw)
            if page % 256 == 0:  # the guest keeps using one page through the flood
                assert translate(HOT + 8, 64, read) == USER_BASE + 8

    # Warm-up: one capacity's worth, so the table and its allocator pools exist.
    flood(range(capacity))
    gc.collect()
    before = rss_bytes()
    begin = time.perf_counter()
    flood(range(capacity, capacity + FLOOD))
    seconds = time.perf_counter() - begin
    gc.collect()
    after = rss_bytes()
    print(
        f"\n{FLOOD:,} UPDATEs at capacity {capacity}: {seconds:.2f} s, "
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, {tlb.stats.evictions:,} evictions"
    )

    assert capacity - capacity // 16 <= len(tlb) <= capacity
    assert tlb.stats.updates == 1 + capacity + FLOOD
    assert tlb.stats.evictions == 1 + capacity + FLOOD - len(tlb)
    assert tlb.entry_at(HOT) is not None  # used: survived a million newer entries
    last = capacity + FLOOD - 1
    assert translate(last * PAGE, 8, read) == USER_BASE + last * PAGE
    assert after - before < RSS_SLACK, f"RSS grew {(after - before) / 2**20:.1f} MiB"
