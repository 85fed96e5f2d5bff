"""Mapped regions: bounds, what a view that outlives its region can still do, and the
fd behind a region: checked against its real size, guarded against shrinking."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from protocol.payloads import MemoryRegion
from tests.daemon import REPO
from tests.probe import memfd_maps, open_fds
from vhostd.memory import AddressFault, MemoryError_, MemoryTable, lingering_mappings
from vhostd.native import ffi, lib

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


# -- the fd behind a region: its real size, its seals, the SIGBUS guard -----------


@pytest.mark.parametrize(
    ("region", "words"),
    [
        (MemoryRegion(0x10000, 8 * PAGE, 0x7F0000, 0), ["does not fit", "0x8000", "0x4000"]),
        (MemoryRegion(0x10000, PAGE, 0x7F0000, 4 * PAGE), ["mmap_offset 0x4000", "beyond"]),
        (MemoryRegion(0x10000, 2 * PAGE, 0x7F0000, 3 * PAGE), ["does not fit", "0x5000"]),
    ],
    ids=["larger_than_file", "offset_at_end", "offset_plus_size_past_end"],
)
def test_a_region_must_fit_in_its_file(ram: int, region: MemoryRegion, words: list[str]) -> None:
    maps = memfd_maps()
    table = MemoryTable(8)
    with pytest.raises(MemoryError_) as info:
        table.replace([region], [ram])
    assert str(info.value).startswith("region gpa 0x10000+"), info.value
    for word in words:
        assert word in str(info.value)
    with pytest.raises(MemoryError_, match="does not fit"):
        table.add(MemoryRegion(0, 5 * PAGE, 0x1000000, 0), ram)
    assert (memfd_maps(), len(table)) == (maps, 0)
    table.clear()


def test_a_region_must_be_a_regular_file() -> None:
    table = MemoryTable(8)
    r, w = os.pipe()
    try:
        with pytest.raises(MemoryError_, match="its fd is a pipe, not a regular file"):
            table.replace([MemoryRegion(0, PAGE, 0x1000, 0)], [r])
    finally:
        os.close(r)
        os.close(w)
    table.clear()


def test_only_files_that_can_shrink_are_guarded(ram: int) -> None:
    sealed = os.memfd_create("test-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sealed, 4 * PAGE)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        table = MemoryTable(8)
        table.replace(
            [MemoryRegion(0, 4 * PAGE, 0x1000000, 0), MemoryRegion(1 << 32, PAGE, 0x2000000, 0)],
            [sealed, ram],
        )
        assert [r.can_shrink for r in table] == [False, True]
        assert table.unsealed == 1
        with pytest.raises(OSError):
            os.ftruncate(sealed, 0)
        table.clear()
    finally:
        os.close(sealed)


def test_a_shrunk_file_reads_zeros_and_reports_its_region() -> None:
    """The memfd shrinks under the mapping: zeros instead of SIGBUS, the eventfd fires."""
    gc.collect()
    fds, maps, faults = open_fds(), memfd_maps(), lib.vhostd_guard_faults()
    fd = _memfd(4 * PAGE, b"\x5a")
    table = MemoryTable(8)
    table.replace([MemoryRegion(0x10000, 3 * PAGE, 0x7F0000, PAGE)], [fd])
    view = table.gpa_view(0x10000, 3 * PAGE)
    assert bytes(view[:4]) == b"\x5a" * 4
    assert table.lost() == []
    os.ftruncate(fd, 0)
    # This read would have been a SIGBUS: the guard puts zeros there instead...
    assert bytes(view[PAGE : PAGE + 8]) == bytes(8)
    view[:4] = b"\xff" * 4  # ...and a write reaches nothing
    assert bytes(view[:4]) == b"\xff" * 4
    assert os.fstat(fd).st_size == 0
    assert lib.vhostd_guard_faults() == faults + 1
    assert table.lost() == ["gpa 0x10000+0x3000"]

    async def lost() -> list[str]:
        with trio.fail_after(5):
            return await table.wait_lost()

    assert trio.run(lost) == ["gpa 0x10000+0x3000"]
    # Reported even when the region is gone before anyone looked.
    ok = _memfd(PAGE, b"\x01")
    table.replace([MemoryRegion(0, PAGE, 0x1000, 0)], [ok])
    assert table.lost() == ["gpa 0x10000+0x3000"]
    del view
    table.clear()
    os.close(fd)
    os.close(ok)
    gc.collect()
    assert (open_fds(), memfd_maps()) == (fds, maps)


def test_a_full_guard_table_refuses_unsealed_regions(ram: int) -> None:
    taken = []
    try:
        while (slot := lib.vhostd_guard_register(ffi.NULL, PAGE, -1)) >= 0:
            taken.append(slot)
        table = MemoryTable(8)
        with pytest.raises(MemoryError_, match="not sealed against shrinking and all 4096"):
            table.replace([MemoryRegion(0, PAGE, 0x1000, 0)], [ram])
        table.clear()
    finally:
        for slot in taken:
            lib.vhostd_guard_unregister(slot)


_OUTSIDE = """
import mmap, os, signal, sys
from protocol.payloads import MemoryRegion
from vhostd.memory import MemoryTable

guarded = os.memfd_create("guarded")
os.ftruncate(guarded, 4096)
table = MemoryTable(1)
table.replace([MemoryRegion(0, 4096, 0x1000, 0)], [guarded])  # the guard is installed
other = os.memfd_create("other")
os.ftruncate(other, 4096)
mem = mmap.mmap(other, 4096)
os.ftruncate(other, 0)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGBUS)
else:
    mem[0]
print("survived")
"""


@pytest.mark.parametrize("how", ["fault", "fault_faulthandler", "kill"])
def test_a_sigbus_outside_the_guarded_ranges_still_kills(how: str) -> None:
    flags = ["-X", "faulthandler"] if how == "fault_faulthandler" else []
    done = subprocess.run(
        [sys.executable, *flags, "-c", _OUTSIDE, how],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "survived" not in done.stdout
    if os.environ.get("VHOSTD_SANITIZE") == "1":
        # ASan's own SIGBUS handler was the one before ours: it reports and exits.
        assert done.returncode != 0 and "AddressSanitizer" in done.stderr, done.stderr
    else:
        assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr)
    if how == "fault_faulthandler":
        assert "Fatal Python error: Bus error" in done.stderr


_FENCE = """
import os, sys
from protocol.payloads import MemoryRegion
from vhostd.memory import MemoryTable
from vhostd.native import ffi

fd = os.memfd_create("fence")
os.ftruncate(fd, 1 << 16)
table = MemoryTable(4)
table.replace([MemoryRegion(0, 1 << 16, 0x7000_0000, 0)], [fd])
region = next(iter(table))
with ffi.from_buffer("uint8_t[]", region.view) as p:
    base = ffi.cast("uint8_t *", p)
    assert base[0] == 0 and base[(1 << 16) - 1] == 0
    print("inside ok", flush=True)
    where = sys.argv[1]
    base[-1 if where == "before" else 1 << 16] = 1
print("survived", flush=True)
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_guest_memory_is_fenced_by_inaccessible_pages(where: str) -> None:
    """One byte past either end of a region faults instead of reaching other memory."""
    done = subprocess.run(
        [sys.executable, "-c", _FENCE, where], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert "inside ok" in done.stdout, done.stderr
    assert "survived" not in done.stdout
    assert done.returncode != 0
