"""Socket activation with no configuration at all, against DPDK's virtio-user.

``systemd-socket-activate -l A --fdname=vm1 -l B --fdname=vm2 -- vhostd run``: no
--config, no --socket. The first front-end connection starts vhostd with both
sockets; each becomes a switch port named by its FileDescriptorName=, and one
testpmd with a virtio-user port on each sends frames through vhostd's switch from
one to the other (``mac`` forwarding: what port 0 receives goes out of port 1 and
back, so the bursts ``tx_first`` injected keep circulating).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon import REPO
from tests.e2e.vhostd_status import assert_clean, port, wait_status
from tests.lab.dpdk import Testpmd, VirtioUser
from tests.lab.fixtures import require_binary
from tests.lab.process import stop_process
from vhostd.config import DEFAULT_CONFIG_PATH

pytestmark = pytest.mark.e2e

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def test_two_activated_sockets_without_configuration_serve_virtio_user(
    tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str
) -> None:
    require_binary("systemd-socket-activate", "systemd")
    if Path(DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists: vhostd run without --config reads it")
    # File names that are not the port names: the names come from --fdname.
    a, b = tmp_sock_dir / "first.sock", tmp_sock_dir / "second.sock"
    control = tmp_sock_dir / "control.sock"
    argv = ["systemd-socket-activate", "-l", str(a), "--fdname=vm1:vm2", "-l", str(b), "--"]
    argv += [sys.executable, "-m", "vhostd", "run", "--control-socket", str(control)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    log = lab_logs / "vhostd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    pmd = Testpmd(
        [VirtioUser(a, mac=MAC_A), VirtioUser(b, mac=MAC_B)],
        lab_logs,
        forward_mode="mac",
        txpkts=64,
        extra_app=(f"--eth-peer=0,{MAC_B}", f"--eth-peer=1,{MAC_A}"),
        name="virtio-user",
    )
    try:
        deadline = time.monotonic() + 15
        while not (a.exists() and b.exists()):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate made no sockets"
            time.sleep(0.05)
        inodes = (a.stat().st_ino, b.stat().st_ino)
        with pmd:  # its connection to `first` starts vhostd
            pmd.wait_link_up(0)
            pmd.wait_link_up(1)
            pmd.command_output("start tx_first 4")
            time.sleep(2.0)
            pmd.stop_forwarding()
            stats = pmd.port_stats()
            snap = wait_status(
                control,
                lambda s: all(p["totals"]["rx"]["packets"] > 0 for p in s["ports"]),
                "both ports delivered frames",
                timeout=15,
            )
            assert pmd.running(), pmd.output()[-3000:]
        vm1, vm2 = port(snap, "vm1"), port(snap, "vm2")
        for p, path in ((vm1, a), (vm2, b)):
            assert (p["socket"], p["mode"], p["state"]) == (str(path), "switch", "connected")
            assert "DRIVER_OK" in p["device_status_names"], p["device_status_names"]
            assert p["totals"]["tx"]["packets"] > 1000, p["totals"]
            assert p["totals"]["rx"]["packets"] > 1000, p["totals"]
            assert_clean(p)
        assert [p["name"] for p in snap["ports"]] == ["vm1", "vm2"]
        assert (vm1["mac"], vm2["mac"]) == (MAC_A, MAC_B)  # learnt by the switch
        assert stats[0].rx_packets > 1000 and stats[1].rx_packets > 1000, stats
        assert stop_process(daemon, 15) == 0, log.read_text()
    finally:
        pmd.stop()
        stop_process(daemon, 15)
    text = log.read_text()
    assert "vm1: front-end connected" in text and "vm2: front-end connected" in text, text
    # Both files are systemd-socket-activate's: still there, never re-bound.
    assert (a.stat().st_ino, b.stat().st_ino) == inodes
