"""Real QEMU guests on packed virtqueues (virtio-net-pci ``packed=on``) through vhostd.

1. Two guests on the switch, one behind a strict vIOMMU (every ring address and
   buffer an IOVA, an unmap + invalidate per buffer), ping each other and move
   a md5-checked TCP stream both ways; both negotiated RING_PACKED (vhostd's
   status and the guest's own feature bits say so).
2. A guest keeps pinging its peer while vhostd restarts under both
   (QEMU ``reconnect=1``): QEMU 7.2 re-sends the packed rings' bases as it
   last knew them, which the rings have long passed; vhostd resumes where the
   rings really stand and the pings go on, nothing stopped as broken.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, port, start_vhostd, status, wait_status
from tests.lab.assets import GuestImage
from tests.lab.qemu import Guest, GuestConfig, Iommu, tcp_pair

pytestmark = pytest.mark.e2e

PACKED = ",packed=on"
RING_PACKED_BIT = 34
SIZE = 8 << 20
TIMEOUT = 300


def test_packed_guests_one_behind_a_strict_viommu_ping_and_tcp(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    socks = {"strict": tmp_sock_dir / "strict.sock", "plain": tmp_sock_dir / "plain.sock"}
    control = tmp_sock_dir / "control.sock"
    server, client = tcp_pair(
        socks["strict"], socks["plain"], size=SIZE, timeout=TIMEOUT, server_iommu=Iommu.STRICT
    )
    # Both ends send SIZE bytes (the server's own default is 8 MiB too).
    server = dataclasses.replace(server, device_args=PACKED, params={**server.params, "size": SIZE})
    client = dataclasses.replace(client, device_args=PACKED)
    with (
        start_vhostd(list(socks.values()), control, lab_logs / "vhostd.log") as vhostd,
        Guest(guest_image, server, lab_logs, "strict") as strict,
        Guest(guest_image, client, lab_logs, "plain") as plain,
    ):
        strict.wait_for(r"DMAR: IOMMU enabled", timeout=90)
        for g in (strict, plain):
            g.wait_for(r"VHOSTD-READY", timeout=90)
        negotiated = status(control)
        r_plain = plain.result(timeout=TIMEOUT + 60)
        r_strict = strict.result(timeout=60)
        final = status(control)
    log = vhostd.log()
    for g, r in ((strict, r_strict), (plain, r_plain)):
        assert r.passed, (r, g.serial())
        assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
        assert r.features[RING_PACKED_BIT] == "1", r.features  # the guest's own view
        assert r.dmar_faults in (0, None), g.serial()
    assert r_plain.ping_loss == 0.0
    for name in socks:
        p = port(negotiated, name)
        assert "RING_PACKED" in p["feature_names"], p["feature_names"]
        assert_clean(port(final, name))
    p = port(negotiated, "strict")
    assert "ACCESS_PLATFORM" in p["feature_names"] and p["iotlb"]["enabled"], p
    io = port(final, "strict")["iotlb"]
    assert io["misses"] > 100 and io["invalidations"] > 0 and io["denied"] == 0, io
    assert "Traceback" not in log, log


def test_packed_guest_pings_on_across_a_vhostd_restart(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    socks = [tmp_sock_dir / "pinger.sock", tmp_sock_dir / "peer.sock"]
    control = tmp_sock_dir / "control.sock"
    count = 200
    pinger = GuestConfig(
        socket=socks[0],
        mac="52:54:00:00:00:01",
        role="ping-tally",
        ip="10.0.0.1/24",
        peer="10.0.0.2",
        params={"timeout": 150, "count": count, "interval": "0.2"},
        reconnect=1,
        device_args=PACKED,
    )
    peer = GuestConfig(
        socket=socks[1],
        mac="52:54:00:00:00:02",
        role="serve",
        ip="10.0.0.2/24",
        peer="10.0.0.1",
        params={"timeout": 150},
        reconnect=1,
        device_args=PACKED,
    )
    vhostd = start_vhostd(socks, control, lab_logs / "vhostd.log")
    try:
        with (
            Guest(guest_image, pinger, lab_logs, "pinger") as g_ping,
            Guest(guest_image, peer, lab_logs, "peer") as g_peer,
        ):
            g_peer.wait_for(r"VHOSTD-SERVING", timeout=90)
            g_ping.wait_for(r"VHOSTD-PING start", timeout=120)
            time.sleep(6)  # ~30 pings answered on the first daemon: the rings moved on
            before = status(control)
            assert all("RING_PACKED" in port(before, p.stem)["feature_names"] for p in socks)
            assert vhostd.stop() == 0, vhostd.log()[-3000:]
            time.sleep(1.5)  # long enough for both QEMUs to notice and start reconnecting
            vhostd = start_vhostd(socks, control, lab_logs / "vhostd.log")
            reconnected = wait_status(
                control,
                lambda s: all(
                    port(s, p.stem)["connected"] and port(s, p.stem)["feature_names"] for p in socks
                ),
                "both QEMUs reconnected and negotiated",
                timeout=30,
            )
            r = g_ping.result(timeout=150)
            after = status(control)
            assert g_peer.running(), g_peer.serial()
    finally:
        vhostd.stop()
    log = vhostd.log()
    assert r.ping_sent == count, (r, g_ping.serial())
    # ~10 s of pings before the restart, ~30 s after: most must be answered, so the
    # rings kept working on the second daemon (a lost ring answers none after it).
    assert r.ping_received is not None and r.ping_received >= 0.75 * count, (r, g_ping.serial())
    assert r.ping_duplicates == 0, r
    for p in socks:
        assert "RING_PACKED" in port(reconnected, p.stem)["feature_names"]
        q = port(after, p.stem)
        assert_clean(q)
        assert q["totals"]["tx"]["packets"] > 20 and q["totals"]["rx"]["packets"] > 20, q["totals"]
    assert "stopped:" not in log and "Traceback" not in log, log
    # QEMU 7.2 sent its first bases again; vhostd found where the rings were.
    assert "already passed; resuming at" in log, log
    assert len(re.findall(r"front-end connected", log)) >= 4, log
