"""Stopping a device the way QEMU 7.2 does, with the device IOTLB in use."""

from __future__ import annotations

import pytest

from protocol import FrontendRequest, VringState, encode_request
from tests.probe import frame, ports, reflected, until
from tests.vusim.frontend import Frontend
from tests.vusim.net import header_len
from tests.vusim.rings import Buffer
from tests.vusim.viommu import MissMode

F = FrontendRequest


@pytest.mark.trio
async def test_get_vring_base_after_set_status_0_says_where_the_rings_stood() -> None:
    """QEMU before 8.1 stops a device with SET_STATUS 0 and only then GET_VRING_BASE."""
    async with ports("reflect") as (_, (port,)), Frontend.connect(port.config.socket) as fe:
        await fe.net_setup()
        fe.post_rx(0, 64)
        await reflected(fe, 2)  # 32 frames each way
        await fe.set_status(0)
        assert {q: await fe.get_vring_base(q) for q in fe.vrings} == {0: 32, 1: 32}


@pytest.mark.parametrize(
    "stop", [F.SET_STATUS, F.GET_VRING_BASE], ids=["SET_STATUS_0", "GET_VRING_BASE"]
)
@pytest.mark.trio
async def test_ring_stopped_in_the_read_that_answers_its_miss(stop: F) -> None:
    """The UPDATE wakes the TX task; the stop read with it must still stop it."""
    async with ports("sink") as (_, (p0,)), Frontend.connect(p0.config.socket) as fe:
        await fe.net_setup(iommu=True)
        assert len(await fe.send_frames(1, [frame(1)])) == 1  # rings translated
        fe.viommu.policy.mode = MissMode.NEVER  # the next miss is answered below
        before = len(fe.viommu.misses())
        hlen = header_len(fe.features)
        gpa = fe.ram.alloc(hlen + 60, 4096)  # a page of its own: a fresh IOVA
        fe.ram.write(gpa, bytes(hlen) + frame(2))
        fe.vrings[1].ring.post([Buffer(gpa, hlen + 60)])
        fe.kick(1)
        await until(lambda: len(fe.viommu.misses()) > before)  # TX waits on its buffer
        updates = [u for m in fe.viommu.misses()[before:] for u in fe.viommu.update_for(m.iova, 1)]
        data = b"".join(encode_request(F.IOTLB_MSG, u) for u in updates)  # no NEED_REPLY
        payload = 0 if stop is F.SET_STATUS else VringState(1, 0)
        await fe.send_raw(data + encode_request(stop, payload))  # one read for vhostd
        if stop is F.GET_VRING_BASE:
            await fe.recv_reply(stop)
        await fe.get_vring_base(0)
        assert p0.session is not None and p0.stats.disconnects == 0
