"""SplitRing layout and bookkeeping, driven by a hand-played device."""

from __future__ import annotations

import struct

from protocol import IotlbPerm
from tests.vusim import badrings
from tests.vusim.dma import IommuDma, PhysicalDma
from tests.vusim.guestram import DEFAULT_UADDR_BASE, PAGE, GuestRam
from tests.vusim.rings import F_INDIRECT, F_NEXT, F_WRITE, Buffer, SplitRing, need_event
from tests.vusim.viommu import VIommu


def _device_complete(ring: SplitRing, head: int, length: int) -> None:
    """What a back-end does: write a used element, then the used index."""
    idx = ring.used_idx()
    base = ring.used_gpa + 4 + 8 * (idx % ring.size)
    ring.ram.write(base, struct.pack("<II", head, length))
    ring.ram.write_u16(ring.used_gpa + 2, idx + 1)


def test_layout_and_addresses_without_iommu() -> None:
    with GuestRam([(0, 64 * PAGE)]) as ram:
        ring = SplitRing(ram, PhysicalDma(ram), 256)
        assert ring.desc_gpa % PAGE == ring.avail_gpa % PAGE == ring.used_gpa % PAGE == 0
        assert ring.desc_addr == DEFAULT_UADDR_BASE + ring.desc_gpa  # SET_VRING_ADDR: uaddr
        buf = ram.alloc(100)
        head = ring.post([Buffer(buf, 100), Buffer(buf + 200, 50, writable=True)])
        d0 = ring.read_desc(head)
        assert d0.addr == buf and d0.flags == F_NEXT  # descriptors: gpa
        d1 = ring.read_desc(d0.next)
        assert (d1.addr, d1.len, d1.flags) == (buf + 200, 50, F_WRITE)
        assert ram.read_u16(ring.avail_gpa + 2) == 1
        assert ram.read_u16(ring.avail_gpa + 4) == head


def test_indirect_chain_under_iommu_and_completion() -> None:
    with GuestRam([(0, 64 * PAGE)]) as ram:
        vi = VIommu(ram)
        ring = SplitRing(ram, IommuDma(vi), 8)
        assert vi.translate(ring.used_addr) == ring.used_gpa
        buf = ram.alloc(64)
        head = ring.post([Buffer(buf, 64), Buffer(buf + 64 * 2, 64, True)], indirect=True)
        d = ring.read_desc(head)
        assert d.flags == F_INDIRECT and d.len == 32
        table = vi.translate(d.addr)
        inner = ring.read_desc(1, table_gpa=table)
        assert inner.flags == F_WRITE and vi.translate(inner.addr) == buf + 128
        _device_complete(ring, head, 10)
        [c] = ring.collect_used()
        assert c.chain is not None and c.len == 10
        assert vi.lookup(d.addr) is None  # unmapped on completion
        assert ring.in_flight() == 0


def test_unknown_used_id_is_reported() -> None:
    with GuestRam([(0, 16 * PAGE)]) as ram:
        ring = SplitRing(ram, PhysicalDma(ram), 4)
        _device_complete(ring, 3, 0)
        [c] = ring.collect_used()
        assert c.chain is None


def test_event_idx() -> None:
    assert need_event(5, 6, 5)
    assert not need_event(10, 6, 5)
    assert need_event(0xFFFF, 1, 0xFFFE)
    with GuestRam([(0, 16 * PAGE)]) as ram:
        ring = SplitRing(ram, PhysicalDma(ram), 4, event_idx=True)
        ram.write_u16(ring.used_gpa + 4 + 8 * 4, 0)  # avail_event = 0
        ring.post([Buffer(ram.alloc(8), 8)])
        assert ring.needs_kick(0)
        ring.post([Buffer(ram.alloc(8), 8)])
        assert not ring.needs_kick(1)
        ring.collect_used()
        assert ram.read_u16(ring.avail_gpa + 4 + 2 * 4) == 0  # used_event follows last_used
        ring.suppress_interrupts()
        assert ram.read_u16(ring.avail_gpa) == 1


def test_bad_rings_write_what_they_say() -> None:
    with GuestRam([(0, 64 * PAGE), (0x100000, 4 * PAGE)]) as ram:
        ring = SplitRing(ram, PhysicalDma(ram), 8)
        h = badrings.next_out_of_range(ring)
        assert ring.read_desc(h).next >= ring.size
        h = badrings.loop(ring, 3)
        d = ring.read_desc(h)
        assert ring.read_desc(ring.read_desc(d.next).next).next == h
        assert badrings.head_out_of_range(ring) >= ring.size
        h = badrings.indirect_len_unaligned(ring)
        assert ring.read_desc(h).len % 16
        h = badrings.crossing_regions(ring)
        d = ring.read_desc(h)
        assert d.addr < 64 * PAGE < d.addr + d.len
        before = ring.avail_idx
        badrings.avail_jump(ring)
        assert (ring.avail_idx - before) & 0xFFFF > ring.size
        h = badrings.wrong_direction(ring, tx=True)
        assert ring.read_desc(h).flags == F_WRITE


def test_too_long_chain_uses_whole_ring() -> None:
    with GuestRam([(0, 16 * PAGE)]) as ram:
        vi = VIommu(ram)
        ring = SplitRing(ram, IommuDma(vi), 4)
        h = badrings.too_long_chain(ring)
        seen, i = [], h
        for _ in range(8):
            seen.append(i)
            i = ring.read_desc(i).next
        assert len(set(seen)) == 4
        assert vi.translate(ring.read_desc(h).addr) is not None
        assert IotlbPerm.READ in vi.lookup(ring.read_desc(h).addr).perm  # type: ignore[union-attr]
