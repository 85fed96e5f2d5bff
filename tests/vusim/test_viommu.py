"""VIommu: mappings, miss answers per policy, invalidate messages."""

from __future__ import annotations

import pytest

from protocol import IotlbPerm, IotlbType
from tests.vusim.dma import IommuDma
from tests.vusim.guestram import DEFAULT_UADDR_BASE, PAGE, GuestRam
from tests.vusim.viommu import Granularity, MissPolicy, VIommu


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam([(0, 16 * PAGE), (0x100000, 16 * PAGE)])


def test_map_lookup_unmap_trims(ram: GuestRam) -> None:
    vi = VIommu(ram)
    vi.map(0x10000, 0x2000, 4 * PAGE, IotlbPerm.RW)
    assert vi.translate(0x10000 + PAGE + 5) == 0x3005
    with pytest.raises(ValueError):
        vi.map(0x11000, 0, PAGE, IotlbPerm.READ)
    vi.unmap(0x11000, PAGE)
    assert vi.lookup(0x11000) is None
    assert vi.translate(0x12000) == 0x4000
    assert [(m.iova, m.size) for m in vi.mappings] == [(0x10000, PAGE), (0x12000, 2 * PAGE)]


def test_miss_answer_is_the_page_with_mapping_perm(ram: GuestRam) -> None:
    vi = VIommu(ram)
    vi.map(0xD000_0000, 0x100000, 4 * PAGE, IotlbPerm.READ)
    upd = vi.answer_miss(0xD000_1234, IotlbPerm.WRITE)
    assert upd is not None
    assert (upd.iova, upd.size, upd.type) == (0xD000_1000, PAGE, IotlbType.UPDATE)
    assert upd.uaddr == DEFAULT_UADDR_BASE + 0x101000
    assert upd.perm == IotlbPerm.READ  # the back-end must refuse a write
    assert vi.answer_miss(0xE000_0000, IotlbPerm.READ) is None  # QEMU stays silent


def test_mapping_granularity_clips_to_region(ram: GuestRam) -> None:
    vi = VIommu(ram, MissPolicy(granularity=Granularity.MAPPING, perm_override=IotlbPerm.RW))
    vi.map(0x40000, 14 * PAGE, 4 * PAGE, IotlbPerm.READ)  # last 2 pages of region 0 + gap
    upd = vi.answer_miss(0x40010, IotlbPerm.READ)
    assert upd is not None and (upd.iova, upd.size, upd.perm) == (0x40000, 2 * PAGE, 3)


def test_update_for_splits_per_mapping(ram: GuestRam) -> None:
    vi = VIommu(ram)
    vi.map_pages(0x8000, 0x1000, 2 * PAGE, IotlbPerm.RW)
    msgs = vi.update_for(0x8000, 2 * PAGE)
    assert [(m.iova, m.size) for m in msgs] == [(0x8000, PAGE), (0x9000, PAGE)]


def test_lazy_flush_ends_at_2_pow_64() -> None:
    msg = VIommu.lazy_flush_msg()
    assert (msg.iova, msg.size) == (0xFEF00000, 0xFFFFFFFF01100000)
    assert msg.end == 1 << 64 and msg.type == IotlbType.INVALIDATE


def test_iommu_dma_keeps_page_offset_and_guard_pages(ram: GuestRam) -> None:
    vi = VIommu(ram)
    dma = IommuDma(vi)
    a = dma.map_buffer(0x1FF0, 0x20, IotlbPerm.READ)  # crosses a page: two pages mapped
    b = dma.map_buffer(0x3000, 8, IotlbPerm.WRITE)
    assert a & 0xFFF == 0xFF0 and vi.translate(a + 0x18) == 0x2008
    assert vi.lookup((a & ~0xFFF) + 2 * PAGE) is None  # guard page
    assert b != 0x3000 and vi.translate(b) == 0x3000
    dma.unmap_buffer(a, 0x20)
    assert vi.lookup(a) is None
