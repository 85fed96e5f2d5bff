"""GuestRam: address spaces, allocation, canary and poison detection."""

from __future__ import annotations

import mmap

import pytest

from tests.vusim.guestram import DEFAULT_UADDR_BASE, PAGE, GuestRam


def _backend_view(ram: GuestRam, gpa: int) -> tuple[mmap.mmap, int]:
    """Map the region's fd a second time, as a back-end would."""
    region = ram.region_of(gpa)
    mem = mmap.mmap(region.fd, region.size, mmap.MAP_SHARED, offset=region.mmap_offset)
    return mem, gpa - region.gpa


def test_regions_gaps_and_translation() -> None:
    with GuestRam([(0, 4 * PAGE), (0x10_0000, 4 * PAGE)]) as ram:
        assert ram.gaps() == [(4 * PAGE, 0x10_0000 - 4 * PAGE)]
        assert ram.gpa_to_uaddr(0x10_0010) == DEFAULT_UADDR_BASE + 0x10_0010
        assert ram.uaddr_to_gpa(DEFAULT_UADDR_BASE + 5) == 5
        with pytest.raises(ValueError):
            ram.read(4 * PAGE - 2, 4)  # crosses into the gap


def test_one_fd_layout_uses_offsets() -> None:
    with GuestRam([(0, 2 * PAGE), (0x100000, 2 * PAGE)], one_fd=True) as ram:
        a, b = ram.regions
        assert a.fd == b.fd and b.mmap_offset == 2 * PAGE
        ram.write(0x100000, b"xyz")
        mem, off = _backend_view(ram, 0x100000)
        assert mem[off : off + 3] == b"xyz"
        mem.close()


def test_alloc_alignment_and_free() -> None:
    with GuestRam([(0, 4 * PAGE)]) as ram:
        a = ram.alloc(10, 64)
        b = ram.alloc(PAGE, PAGE)
        assert a % 64 == 0 and b % PAGE == 0 and b >= a + 10
        ram.free(a)
        ram.free(b)
        assert ram.alloc(4 * PAGE, PAGE) == 0
        with pytest.raises(MemoryError):
            ram.alloc(1)


def test_canary_reports_only_foreign_writes_outside_allowed() -> None:
    with GuestRam([(0, 4 * PAGE)]) as ram:
        buf = ram.alloc(256)
        ram.arm_canary()
        ram.write(buf, b"driver writes are not violations")
        ram.allow_device_write(buf, 256)
        mem, _ = _backend_view(ram, 0)
        mem[buf : buf + 4] = b"ok!!"  # allowed
        mem[3 * PAGE + 7 : 3 * PAGE + 9] = b"!!"  # stray write into free memory
        mem.close()
        [v] = ram.canary_violations()
        assert (v.gpa, v.size, v.before, v.after) == (3 * PAGE + 7, 2, b"\xa5\xa5", b"!!")
        assert (buf, 4) in ram.device_writes()


def test_settle_accepts_completed_buffer() -> None:
    with GuestRam([(0, PAGE)]) as ram:
        ram.arm_canary()
        mem, _ = _backend_view(ram, 0)
        mem[0:2] = b"hi"
        mem.close()
        assert ram.canary_violations()
        ram.settle(0, 2)
        assert ram.canary_violations() == []


def test_poison_detection_any_alignment() -> None:
    with GuestRam([(0, 4 * PAGE)]) as ram:
        gpa = ram.poison(PAGE)
        leaked = ram.read(gpa + 3, 40)
        assert ram.leaked_poison(b"frame" + leaked)
        assert not ram.leaked_poison(b"\x00" * 64)
