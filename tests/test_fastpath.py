"""The C burst path against the Python reference, on random and malicious rings.

The scenarios and the comparison are ``tests/differential.py``; this runs a
fixed set of seeds on every test run.
"""

from __future__ import annotations

import gc

import pytest

from tests.differential import (
    SEEDS,
    build,
    compare,
    differential,
    differential_batch,
    queue_of,
    retry,
)
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
from vhostd.iotlb import IotlbDenied, IotlbMiss
from vhostd.memory import lingering_mappings
from vhostd.net import QueueStats
from vhostd.virtqueue import QueueError


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "macswap"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_rx_batch_matches_reference(seed: int, swap: bool) -> None:
    compare(*differential_batch(seed, swap))


def test_rx_batch_scenarios_cover_partial_bursts() -> None:
    """Some seeds stop a batch midway (no buffer, miss, fault) and some finish one."""
    partial = whole = 0
    for seed in range(SEEDS):
        s = build(seed, rx=True)
        try:
            q = queue_of(s)
            rx = FastRxQueue(q, s.features, QueueStats())
            ok, _ = retry(s, [], q.refresh)
            if not ok:
                continue
            batch, keep = FrameBurst.of(s.frames)
            done = rx.deliver_batch(batch, True)
            del keep
            partial += 0 < done < len(s.frames)
            whole += done == len(s.frames)
        finally:
            s.close()
    assert partial >= 10 and whole >= 1, (partial, whole)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_tx_matches_reference(seed: int) -> None:
    compare(*differential(seed, rx=False))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_rx_matches_reference(seed: int) -> None:
    compare(*differential(seed, rx=True))


def test_scenarios_cover_the_interesting_outcomes() -> None:
    """The seeds above hit misses, denials, every common fault, real traffic and logging."""
    seen: set[str] = set()
    for seed in range(SEEDS):
        for rx in (False, True):
            ref, _ = differential(seed, rx)
            for event in ref["events"]:
                seen.add(event[0] if event[0] != "fault" else event[1])
            if ref["frames"]:
                seen.add("frames")
            if ref["log"] and any(ref["log"]):
                seen.add("logged RX" if rx else "logged TX")
    for needed in (
        "logged RX",
        "logged TX",
        "miss",
        "denied",
        "frames",
        "head_out_of_range",
        "next_out_of_range",
        "chain_loop_or_too_long",
        "avail_index_jump",
        "indirect_bad_length",
        "indirect_nested",
        "wrong_descriptor_direction",
        "address_unmapped",
        "chain_too_long",
    ):
        assert needed in seen, needed


def test_queues_in_garbage_cycles_are_collected_safely() -> None:
    """Ring and frame views handed to C must not stay exported into the collector.

    CPython 3.11 crashes when it clears a memoryview in a cycle while some
    buffer export of it is still alive (as an ``ffi.from_buffer`` would be).
    Queues live in such cycles (sessions, tracebacks of ring errors), so this
    builds many, drives them through C, and collects them.
    """
    gc.collect()
    before = lingering_mappings()
    for seed in range(40):
        s = build(seed, rx=seed % 2 == 0)
        q = queue_of(s)
        mq: FastRxQueue | FastTxQueue
        try:
            if seed % 2 == 0:
                mq = FastRxQueue(q, s.features, QueueStats())
                q.refresh()
                mq.deliver(memoryview(bytearray(s.frames[0])))
            else:
                mq = FastTxQueue(q, s.features, 1 << 16, QueueStats())
                mq.burst(None)
        except (IotlbMiss, IotlbDenied, QueueError) as exc:
            cycle: list[object] = [exc, mq, q]
            cycle.append(cycle)
            del cycle
        holder: list[object] = [mq, q, s.mem]
        holder.append(holder)
        del mq, q, holder
        s.close()
        gc.collect()
    assert lingering_mappings() == before


PACKED_SEEDS = 120


@pytest.mark.parametrize("hostile", [False, True], ids=["posted", "hostile"])
@pytest.mark.parametrize("seed", range(PACKED_SEEDS))
def test_packed_tx_matches_reference(seed: int, hostile: bool) -> None:
    compare(*differential(seed, rx=False, hostile=hostile, packed=True))


@pytest.mark.parametrize("hostile", [False, True], ids=["posted", "hostile"])
@pytest.mark.parametrize("seed", range(PACKED_SEEDS))
def test_packed_rx_matches_reference(seed: int, hostile: bool) -> None:
    compare(*differential(seed, rx=True, hostile=hostile, packed=True))


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "macswap"])
@pytest.mark.parametrize("seed", range(PACKED_SEEDS))
def test_packed_rx_batch_matches_reference(seed: int, swap: bool) -> None:
    compare(*differential_batch(seed, swap, packed=True))


def test_packed_scenarios_cover_the_interesting_outcomes() -> None:
    """Packed seeds hit misses, denials, every packed fault, traffic, wraps and logging."""
    seen: set[str] = set()
    for seed in range(PACKED_SEEDS):
        for rx in (False, True):
            ref, _ = differential(seed, rx, packed=True)
            for event in ref["events"]:
                seen.add(event[0] if event[0] != "fault" else event[1])
            if ref["frames"]:
                seen.add("frames")
            if ref["log"] and any(ref["log"]):
                seen.add("logged RX" if rx else "logged TX")
            s = build(seed, rx, packed=True)
            start = s.ring.start  # type: ignore[union-attr]
            s.close()
            if (ref["indices"][0] ^ start) & 0x8000:
                seen.add("wrapped")
    for needed in (
        "logged RX",
        "logged TX",
        "miss",
        "denied",
        "frames",
        "wrapped",
        "wrong_wrap_bits",
        "buffer_id_out_of_range",
        "chain_loop_or_too_long",
        "indirect_bad_length",
        "indirect_nested",
        "indirect_with_next",
        "wrong_descriptor_direction",
        "address_unmapped",
        "chain_too_long",
    ):
        assert needed in seen, needed
