"""Live migration's dirty log, driven by the simulator as QEMU drives it.

Logging is turned on while frames flow both ways (a reflect port: the
guest's TX comes back on its RX); from then on every guest page vhostd
changes must have its bit set in the front-end's bitmap, whatever the ring
layout (mergeable buffers or not, EVENT_IDX or not), with or without the
device IOTLB (IOVAs unlike guest-physical addresses; strict invalidation
makes misses happen while logging), over two memory regions with a gap.
Nothing outside the bitmap's part of the log file is ever written.
"""

from __future__ import annotations

import os

import pytest

from protocol import FrontendRequest, LogInfo, VirtioFeature, VringAddr
from tests.probe import frame, open_fds, ports, reflected, until
from tests.vusim.dirtylog import DirtyBitmap
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.guestram import PAGE
from vhostd.control import format_status, snapshot
from vhostd.metrics import DaemonCollector

VF = VirtioFeature
F = FrontendRequest


def features(mergeable: bool, event_idx: bool, packed: bool = False) -> int:
    out = int(DEFAULT_NET_FEATURES | VF.RING_INDIRECT_DESC)
    if not mergeable:
        out &= ~VF.NET_MRG_RXBUF
    if event_idx:
        out |= VF.RING_EVENT_IDX
    if packed:
        out |= VF.RING_PACKED
    return out


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("iommu", ["off", "on", "strict"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
@pytest.mark.parametrize("mergeable", [False, True], ids=["no_mrg", "mrg"])
@pytest.mark.trio
async def test_every_page_written_while_logging_is_logged(
    mergeable: bool, event_idx: bool, iommu: str, layout: str
) -> None:
    """Packed rings: used descriptors are written into the descriptor ring, and the
    device event area takes the kick requests; both are logged."""
    packed = layout == "packed"
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup(
            iommu=iommu != "off", features=features(mergeable, event_idx, packed), queue_size=64
        )
        assert bool(fe.features & VF.RING_PACKED) == packed
        fe.strict_iommu = iommu == "strict"
        fe.post_rx(0, 64)
        await reflected(fe, 2)
        bitmap = await fe.set_log_base(offset=PAGE)
        await fe.start_logging()
        session = port.session
        assert session is not None and session.logging
        fe.ram.arm_canary(fill_free=False)
        await reflected(fe, 6, start=100)
        await fe.stop()  # GET_VRING_BASE: after it, nothing more is written
        written = fe.ram.device_pages()
        assert len(written) >= 3, written  # used rings and RX buffers at least
        missing = written - bitmap.pages()
        assert not missing, [hex(p * PAGE) for p in sorted(missing)]
        assert bitmap.sentinels_intact()
        dirty = session.dirty_log
        assert dirty is not None and dirty.logged >= len(written) and dirty.overflow == 0


@pytest.mark.trio
async def test_logging_stops_and_a_new_log_replaces_the_old() -> None:
    """QEMU sends SET_LOG_BASE again when memory grows; LOG_ALL goes when migration ends."""
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        fe.post_rx(0, 64)
        first = await fe.set_log_base()
        await fe.start_logging()
        await reflected(fe, 1)
        assert first.pages()
        second = await fe.set_log_base(offset=2 * PAGE)
        first.clear()
        await reflected(fe, 1, start=50)
        assert second.pages() and not first.pages()  # the old log is no longer written
        assert port.stats.log_resizes == 1
        await fe.stop_logging()
        second.clear()
        await reflected(fe, 1, start=80)
        assert not second.pages()
        session = port.session
        assert session is not None and not session.logging
        assert port.stats.queue_faults.total() == 0 and port.stats.protocol_errors == {}


@pytest.mark.trio
async def test_bad_dirty_logs_end_only_their_connection() -> None:
    """A log that cannot be used: the front-end waits for a reply that cannot say so."""
    async with ports("reflect", "reflect") as (_, (port, other)):
        base = open_fds()
        cases: list[tuple[str, int | None, int, int]] = [
            ("size 0", None, 0, 0),
            ("too small for the memory table", None, 16, 0),
            ("offset beyond the file", None, None, 1 << 30),  # type: ignore[list-item]
            ("not a file", -1, None, 0),  # type: ignore[list-item]
        ]
        for n, (what, fd, size, offset) in enumerate(cases, 1):
            async with Frontend.connect(port.config.socket) as fe:
                await fe.net_setup()
                bitmap = DirtyBitmap.create(fe.ram)
                rp, wp = os.pipe()
                try:
                    info = LogInfo(bitmap.size if size is None else size, offset)
                    use = rp if fd == -1 else bitmap.fd
                    await fe.send(F.SET_LOG_BASE, info, [use], expect_reply=False)
                    await fe.expect_closed()
                finally:
                    os.close(rp)
                    os.close(wp)
                    bitmap.close()
            await until(lambda: port.session is None)
            assert port.stats.protocol_errors["bad_log"] == n, what
            async with Frontend.connect(other.config.socket) as fe2:
                await fe2.net_setup()
                fe2.post_rx(0, 8)
                await reflected(fe2, 1)
            await until(lambda: other.session is None)
        assert open_fds() == base


@pytest.mark.trio
async def test_log_all_without_a_log_and_log_addresses_outside_memory_are_refused() -> None:
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        reply = await fe.send(F.SET_FEATURES, fe.features | VF.LOG_ALL, need_reply=True)
        assert reply is not None and reply.payload != 0
        assert port.stats.protocol_errors == {"log_all_without_log": 1}
        ring = fe.vrings[0].ring
        outside = VringAddr(0, 1, ring.desc_addr, ring.used_addr, ring.avail_addr, 0x8000_0000)
        reply = await fe.send(F.SET_VRING_ADDR, outside, need_reply=True)
        assert reply is not None and reply.payload != 0
        assert port.stats.protocol_errors["bad_vring_addr"] == 1
        fe.post_rx(0, 16)
        await reflected(fe, 1)  # the rings were never disturbed


@pytest.mark.trio
async def test_a_log_truncated_while_logging_ends_only_its_connection() -> None:
    async with (
        ports("reflect", "reflect") as (_, (port, other)),
        Frontend.connect(port.config.socket) as fe,
        Frontend.connect(other.config.socket) as fe2,
    ):
        await fe.net_setup()
        await fe2.net_setup()
        fe.post_rx(0, 64)
        fe2.post_rx(0, 64)
        bitmap = await fe.set_log_base()
        await fe.start_logging()
        os.ftruncate(bitmap.fd, 0)
        await fe.send_frames(1, [frame(i) for i in range(4)], timeout=5)
        await fe.expect_closed()
        await until(lambda: port.session is None)
        assert port.stats.memory_faults == 1
        await reflected(fe2, 2)


@pytest.mark.trio
async def test_status_and_metrics_show_a_port_logging() -> None:
    async with ports("reflect") as (daemon, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        fe.post_rx(0, 32)
        (snap,) = snapshot(daemon)["ports"]
        assert snap["logging"] is False and snap["log_pages"] == 0
        await fe.set_log_base()
        await fe.start_logging()
        await reflected(fe, 1)
        (snap,) = snapshot(daemon)["ports"]
        assert snap["logging"] is True and snap["log_pages"] > 0
        assert "logging for live migration" in format_status(snapshot(daemon))
        scraped = {
            (sample.name, sample.labels.get("port")): sample.value
            for family in DaemonCollector(daemon).collect()
            for sample in family.samples
        }
        assert scraped[("vhostd_logging", "p0")] == 1
        assert scraped[("vhostd_log_pages_total", "p0")] == snap["log_pages"]
        await fe.stop_logging()
        (snap,) = snapshot(daemon)["ports"]
        assert snap["logging"] is False and snap["log_pages"] > 0


@pytest.mark.trio
async def test_a_mac_moves_to_its_new_port_at_once() -> None:
    """After a switch-over the guest speaks from its new port: no wait for ageing."""
    async with (
        ports("switch", "switch", "switch") as (daemon, (a, b, p)),
        Frontend.connect(a.config.socket) as fa,
        Frontend.connect(b.config.socket) as fb,
        Frontend.connect(p.config.socket) as fp,
    ):
        for fe in (fa, fb, fp):
            await fe.net_setup()
            fe.post_rx(0, 32)
        mac_m, mac_p = bytes.fromhex("525400000002"), bytes.fromhex("525400000003")
        await fa.send_frames(1, [mac_p + mac_m + b"\x88\xb5" + bytes(46)])
        await fp.recv_frames(0, count=1, timeout=5)
        await fb.send_frames(1, [mac_p + mac_m + b"\x88\xb5" + bytes(46)])  # M, now on B
        await fp.recv_frames(0, count=1, timeout=5)
        assert daemon.switch.moves == 1
        for fe in (fa, fb):  # P's MAC was unknown: those two were flooded
            await fe.recv_frames(0, timeout=0.3)
        await fp.send_frames(1, [mac_m + mac_p + b"\x88\xb5" + bytes(46)])
        assert len(await fb.recv_frames(0, count=1, timeout=5)) == 1
        assert await fa.recv_frames(0, timeout=0.3) == []
        assert snapshot(daemon)["switch"]["mac_moves"] == 1
