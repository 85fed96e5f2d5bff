"""Mapped regions: bounds, and what a view that outlives its region can still do."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from protocol.payloads import MemoryRegion
from tests.probe import memfd_maps
from vhostd.memory import AddressFault, MemoryError_, MemoryTable, lingering_mappings

PAGE = 4096


def _memfd(size: int, fill: bytes) -> int:
    fd = os.memfd_create("test-memory", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, fill * size, 0)
    return fd


@pytest.fixture
def ram() -> Iterator[int]:
    fd = _memfd(4 * PAGE, b"\xa5")
    yield fd
    os.close(fd)


def test_views_stay_inside_their_region(ram: int) -> None:
    table = MemoryTable(8)
    table.replace([MemoryRegion(0x10000, 2 * PAGE, 0x7F0000, PAGE)], [ram])
    assert bytes(table.gpa_view(0x10000, 4)) == b"\xa5" * 4
    assert bytes(table.uaddr_view(0x7F0000 + 2 * PAGE - 1, 1)) == b"\xa5"
    with pytest.raises(AddressFault):
        table.gpa_view(0x10000 + 2 * PAGE - 1, 2)
    with pytest.raises(AddressFault):
        table.uaddr_view(0x7F0000 - 1, 1)
    table.clear()


def test_a_view_that_outlives_its_region_touches_nothing_of_the_guest(ram: int) -> None:
    gc.collect()
    before, maps = lingering_mappings(), memfd_maps()
    table = MemoryTable(8)
    table.replace([MemoryRegion(0, 4 * PAGE, 0x1000000, 0)], [ram])
    stale = table.gpa_view(PAGE, 16)
    assert memfd_maps() == maps + 1
    table.clear()
    # The guest's pages are gone at once, but the address range is still ours...
    assert memfd_maps() == maps
    assert lingering_mappings() == before + 1
    # ...so the forgotten view reads zeros and writes reach neither the guest nor anything else.
    assert bytes(stale) == bytes(16)
    stale[:4] = b"\xff" * 4
    assert os.pread(ram, 4, PAGE) == b"\xa5" * 4
    del stale
    gc.collect()
    assert lingering_mappings() == before


def test_a_table_that_fails_to_map_leaves_nothing_behind(ram: int) -> None:
    gc.collect()
    before, maps = lingering_mappings(), memfd_maps()
    table = MemoryTable(8)
    overlapping = [MemoryRegion(0, 2 * PAGE, 0x1000000, 0), MemoryRegion(PAGE, PAGE, 0x2000000, 0)]
    with pytest.raises(MemoryError_):
        table.replace(overlapping, [ram, ram])
    gc.collect()
    assert (memfd_maps(), lingering_mappings(), len(table)) == (maps, before, 0)
