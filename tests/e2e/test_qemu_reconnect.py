"""A guest's QEMU dies and comes back on the same socket while another port keeps going.

The steady guest pings the restarting one without pause. Its port must keep being
served (its TX counters grow) while the other port has no front-end, and traffic must
flow again once the new QEMU has connected and booted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.vhostd_status import Status, assert_clean, port, start_vhostd, wait_status
from tests.lab.assets import GuestImage
from tests.lab.qemu import Guest, GuestConfig

pytestmark = pytest.mark.e2e


def tx_packets(snapshot: Status, name: str) -> int:
    packets: int = port(snapshot, name)["totals"]["tx"]["packets"]
    return packets


def test_guest_restart_on_the_same_socket(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    socks = [tmp_sock_dir / "steady.sock", tmp_sock_dir / "flaky.sock"]
    control = tmp_sock_dir / "control.sock"
    steady = GuestConfig(  # pings the flaky guest for ~80 s, through its outage
        socket=socks[0],
        mac="52:54:00:00:00:01",
        role="ping",
        ip="10.0.0.1/24",
        peer="10.0.0.2",
        params={"timeout": 150, "count": 400, "interval": "0.2"},
    )

    def flaky(role: str) -> GuestConfig:
        return GuestConfig(
            socket=socks[1],
            mac="52:54:00:00:00:02",
            role=role,
            ip="10.0.0.2/24",
            peer="10.0.0.1",
            params={"timeout": 150, "count": 10},
        )

    with (
        start_vhostd(socks, control, lab_logs / "vhostd.log") as vhostd,
        Guest(guest_image, steady, lab_logs, "steady") as g_steady,
    ):
        with Guest(guest_image, flaky("serve"), lab_logs, "flaky-1") as first:
            g_steady.wait_for(r"VHOSTD-PEER up", timeout=120)
            first.wait_for(r"VHOSTD-SERVING", timeout=60)
            assert first.proc is not None
            first.proc.kill()  # no shutdown: the socket just closes under vhostd
            first.proc.wait(10)
        down = wait_status(
            control, lambda s: not port(s, "flaky")["connected"], "flaky port disconnected"
        )
        # While the flaky port has no front-end, the steady port is still served.
        wait_status(
            control,
            lambda s: tx_packets(s, "steady") >= tx_packets(down, "steady") + 5,
            "steady guest's frames still taken while the other port is down",
        )
        with Guest(guest_image, flaky("ping"), lab_logs, "flaky-2") as second:
            r2 = second.result(timeout=150)
        after = wait_status(
            control, lambda s: port(s, "flaky")["disconnects"] >= 2, "second QEMU gone"
        )
        assert g_steady.running(), g_steady.serial()  # pinged through all of it
    log = vhostd.log()

    assert r2.passed, (r2, second.serial())
    assert r2.ping_loss == 0.0
    flaky_port, steady_port = port(after, "flaky"), port(after, "steady")
    assert flaky_port["connections"] == 2, flaky_port
    assert steady_port["connections"] == 1 and steady_port["disconnects"] == 0, steady_port
    # The second guest's pings and replies crossed the switch after the restart.
    assert tx_packets(after, "flaky") >= tx_packets(down, "flaky") + 10, flaky_port["totals"]
    assert steady_port["totals"]["rx"]["packets"] > port(down, "steady")["totals"]["rx"]["packets"]
    for p in (flaky_port, steady_port):
        assert_clean(p)
    assert "Traceback" not in log, log
