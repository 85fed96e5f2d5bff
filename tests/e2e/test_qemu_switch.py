"""Two QEMU guests (no vIOMMU) on one vhostd switch: ping and 8 MiB TCP each way."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, port, start_vhostd, status
from tests.lab.assets import GuestImage
from tests.lab.qemu import Guest, tcp_pair

pytestmark = pytest.mark.e2e

SIZE = 8 << 20


def test_two_guests_ping_and_tcp_through_the_switch(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    socks = [tmp_sock_dir / "g0.sock", tmp_sock_dir / "g1.sock"]
    control = tmp_sock_dir / "control.sock"
    server, client = tcp_pair(socks[0], socks[1], size=SIZE, timeout=150)
    with (
        start_vhostd(socks, control, lab_logs / "vhostd.log") as vhostd,
        Guest(guest_image, server, lab_logs, "server") as g0,
        Guest(guest_image, client, lab_logs, "client") as g1,
    ):
        g0.wait_for(r"VHOSTD-READY", timeout=90)
        g1.wait_for(r"VHOSTD-READY", timeout=90)
        negotiated = status(control)  # features are only reported while connected
        r1 = g1.result(timeout=240)
        r0 = g0.result(timeout=60)
        final = status(control)
    log = vhostd.log()

    assert r1.passed, (r1, g1.serial())
    assert r0.passed, (r0, g0.serial())
    assert r1.ping_loss == 0.0
    for r in (r0, r1):
        assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
    for name in ("g0", "g1"):
        p = port(negotiated, name)
        assert p["connected"], p
        # No vIOMMU: ACCESS_PLATFORM must not be negotiated, and no IOTLB in use.
        assert "VERSION_1" in p["feature_names"], p["feature_names"]
        assert "ACCESS_PLATFORM" not in p["feature_names"], p["feature_names"]
        assert not p["iotlb"]["enabled"]
        f = port(final, name)
        assert_clean(f)
        assert f["iotlb"]["lookups"] == f["iotlb"]["misses"] == 0, f["iotlb"]
        # Each guest sent 8 MiB and received 8 MiB through its own port's rings.
        assert f["totals"]["tx"]["bytes"] > SIZE, f["totals"]
        assert f["totals"]["rx"]["bytes"] > SIZE, f["totals"]
    assert "Traceback" not in log, log
