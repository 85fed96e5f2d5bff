"""A QEMU guest reaches a TAP uplink that vhostd creates inside a test namespace.

vhostd itself runs in the namespace (``ip netns exec NS python -m vhostd run --tap``), so
the TAP is created there and no traffic touches the host's own interfaces. Two guests
boot in parallel so both connection directions cost one boot: the host connects to a
tcp-server guest, and a tcp-client guest connects to the host; each moves 8 MiB each way.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, port, start_vhostd, status
from tests.lab.assets import GuestImage
from tests.lab.netns import Netns, tcp_peer_result
from tests.lab.qemu import Guest, GuestConfig

pytestmark = pytest.mark.e2e

SIZE = 8 << 20
TAP = "vhd0"
HOST = "10.0.0.2"


def wait_link(netns: Netns, dev: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while netns.run(["ip", "link", "show", dev], check=False).returncode != 0:
        assert time.monotonic() < deadline, f"vhostd did not create {dev} in {netns.name}"
        time.sleep(0.1)


def test_guests_reach_a_tap_in_a_netns_both_directions(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path, netns: Netns
) -> None:
    socks = [tmp_sock_dir / "srv.sock", tmp_sock_dir / "cli.sock"]
    control = tmp_sock_dir / "control.sock"
    server = GuestConfig(  # the host connects to it
        socket=socks[0],
        mac="52:54:00:00:00:01",
        role="tcp-server",
        ip="10.0.0.1/24",
        peer=HOST,
        params={"timeout": 150, "port": 5201},
    )
    client = GuestConfig(  # it connects to the host
        socket=socks[1],
        mac="52:54:00:00:00:03",
        role="tcp-client",
        ip="10.0.0.3/24",
        peer=HOST,
        params={"timeout": 150, "port": 5301, "count": 10, "size": SIZE},
    )
    vhostd = start_vhostd(
        socks, control, lab_logs / "vhostd.log", "--tap", TAP, wrapper=netns.exec_argv([])
    )
    with vhostd:
        wait_link(netns, TAP)
        netns.configure(TAP, f"{HOST}/24")
        listener = netns.tcp_peer("server", HOST, port=5301, size=SIZE, timeout=180)
        with (
            Guest(guest_image, server, lab_logs, "srv") as g_srv,
            Guest(guest_image, client, lab_logs, "cli") as g_cli,
        ):
            g_srv.wait_for(r"VHOSTD-TCP listening", timeout=90)
            netns.wait_reachable("10.0.0.1", timeout=60)
            assert netns.ping("10.0.0.1", count=10) == 0.0
            connector = netns.tcp_peer("client", "10.0.0.1", port=5201, size=SIZE, timeout=180)
            r_cli = g_cli.result(timeout=240)
            r_srv = g_srv.result(timeout=120)
            host_in = tcp_peer_result(listener, timeout=60)
            host_out = tcp_peer_result(connector, timeout=60)
        final = status(control)
    log = vhostd.log()

    assert r_srv.passed, (r_srv, g_srv.serial())
    assert r_cli.passed, (r_cli, g_cli.serial())
    assert r_cli.ping_loss == 0.0  # guest -> host ping
    for r in (r_srv, r_cli):
        assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
    for host in (host_in, host_out):
        assert host.get("md5_ok") is True and host.get("recv") == SIZE, host
    (tap,) = final["taps"]
    assert tap["name"] == TAP
    # Both guests' 8 MiB crossed the TAP each way.
    assert tap["rx_bytes"] > 2 * SIZE and tap["tx_bytes"] > 2 * SIZE, tap
    for name in ("srv", "cli"):
        assert_clean(port(final, name))
    assert "Traceback" not in log, log
