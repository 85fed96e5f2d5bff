"""The control socket and ``vhostd status``: what an operator (or a test) reads."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from protocol import FrontendRequest, VirtioFeature, VringState
from tests.daemon import REPO, VhostdProcess, port_config, serving
from tests.vusim.frontend import BackendNack, Frontend
from vhostd import buildinfo
from vhostd.control import fetch, flag_names, format_fdb, format_status, snapshot
from vhostd.runtime import SetupError


def test_flag_names_decode_known_and_unknown_bits() -> None:
    value = int(VirtioFeature.VERSION_1 | VirtioFeature.NET_MAC) | 1 << 63
    assert flag_names(value, VirtioFeature) == ["NET_MAC", "VERSION_1", "bit_63"]
    assert flag_names(0, VirtioFeature) == []


def test_status_reflects_features_rings_and_counters(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "vm1.sock"
    ctl = tmp_sock_dir / "sub" / "control.sock"  # parent directory created by the daemon

    async def main() -> None:
        async with serving(
            port_config(sock, "sink", iommu=True, queue_pairs=1), control_socket=str(ctl)
        ) as d:
            assert d.control_path == str(ctl)
            assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
            before = await trio.to_thread.run_sync(fetch, str(ctl))
            (p,) = before["ports"]
            assert (p["name"], p["state"], p["connected"]) == ("vm1", "listening", False)
            assert p["features"] == "0x0" and before["healthy"] is True
            assert [v["started"] for v in p["vrings"]] == [False, False]

            async with Frontend.connect(str(sock)) as fe:
                await fe.net_setup(queue_pairs=1, iommu=True)
                done = await fe.send_frames(1, [bytes([i]) * 60 for i in range(50)])
                assert len(done) == 50
                snap = snapshot(d)
                over_socket = await trio.to_thread.run_sync(fetch, str(ctl))
                (p,) = snap["ports"]
                assert p["state"] == "connected" and p["connected"] is True
                assert int(p["features"], 16) == fe.features
                assert "ACCESS_PLATFORM" in p["feature_names"]
                assert "VERSION_1" in p["feature_names"]
                assert int(p["protocol_features"], 16) == fe.protocol_features
                assert "BACKEND_REQ" in p["protocol_feature_names"]
                assert "DRIVER_OK" in p["device_status_names"]
                rx, tx = p["vrings"]
                assert (rx["direction"], tx["direction"]) == ("rx", "tx")
                assert tx["started"] and tx["enabled"] and tx["failed"] is None
                assert tx["size"] == 256
                assert tx["packets"] == 50 and tx["bytes"] == 50 * 60
                assert tx["last_avail"] == 50 and tx["last_used"] == 50
                assert p["totals"]["tx"]["packets"] == 50
                io = p["iotlb"]
                assert io["enabled"] is True
                assert io["miss_sent"] > 0 and io["updates"] > 0
                assert io["entries"] > 0 and io["lookups"] >= io["hits"] > 0
                # The socket serves the same snapshot (time and uptime aside).
                stable = ("index", "size", "started", "enabled", "packets", "bytes", "last_used")
                assert [{k: v[k] for k in stable} for v in over_socket["ports"][0]["vrings"]] == [
                    {k: v[k] for k in stable} for v in p["vrings"]
                ]
                assert over_socket["ports"][0]["iotlb"]["updates"] == io["updates"]

            # Counters outlive the connection; the vring state does not.
            with trio.fail_after(5):
                while d.ports["vm1"].session is not None:
                    await trio.sleep(0.01)
            (p,) = snapshot(d)["ports"]
            assert p["state"] == "listening" and p["disconnects"] == 1
            assert p["vrings"][1]["packets"] == 50 and not p["vrings"][1]["started"]
            assert p["iotlb"]["entries"] == 0 and p["iotlb"]["enabled"] is False
            assert "vm1" in format_status(snapshot(d))
        assert not ctl.exists()  # removed on exit

    trio.run(main)


def test_failed_ring_reason_is_shown(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "bad.sock"

    async def main() -> None:
        async with (
            serving(
                port_config(sock, "sink", queue_pairs=1),
                control_socket=str(tmp_sock_dir / "c.sock"),
            ) as d,
            Frontend.connect(str(sock)) as fe,
        ):
            await fe.net_setup(queue_pairs=1)
            ring = fe.vrings[1].ring
            ring.push_heads([ring.size + 7])  # head index out of range
            fe.kick(1)
            with trio.fail_after(5):
                while not fe.err_pending(1):
                    await trio.sleep(0.01)
            (p,) = snapshot(d)["ports"]
            assert p["vrings"][1]["failed"]
            assert sum(p["queue_faults"].values()) == 1
            assert "failed: " in format_status(snapshot(d))

    trio.run(main)


def test_live_control_socket_is_not_taken_over(tmp_sock_dir: Path) -> None:
    """A second daemon with the same control socket refuses to start (instance lock)."""
    ctl = str(tmp_sock_dir / "c.sock")

    async def main() -> None:
        async with serving(port_config(tmp_sock_dir / "a.sock"), control_socket=ctl) as first:
            with pytest.raises(BaseExceptionGroup) as refused:
                async with serving(port_config(tmp_sock_dir / "b.sock"), control_socket=ctl):
                    pass
            assert refused.group_contains(
                SetupError, match=rf"another vhostd \(pid {os.getpid()}\)"
            )
            assert first.control_path == ctl and not (tmp_sock_dir / "b.sock").exists()
            snap = await trio.to_thread.run_sync(fetch, ctl)
            assert [p["name"] for p in snap["ports"]] == ["a"]

    trio.run(main)


def test_vhostd_status_cli_against_a_daemon_process(tmp_sock_dir: Path, tmp_path: Path) -> None:
    sock, ctl = tmp_sock_dir / "vm9.sock", tmp_sock_dir / "control.sock"
    args = ["--socket", str(sock), "--mode", "sink", "--control-socket", str(ctl)]
    with VhostdProcess(args, tmp_path / "vhostd.log").start(wait_for=[sock, ctl]) as proc:

        def status(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "vhostd", "status", "--control-socket", str(ctl), *extra],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=30,
                check=False,
            )

        table = status()
        assert table.returncode == 0, table.stderr + proc.log()
        header = table.stdout.splitlines()[2].split()
        assert header[:3] == ["PORT", "STATE", "MODE"]
        row = table.stdout.splitlines()[3].split()
        assert row[:3] == ["vm9", "listening", "sink"]
        assert "VRING" in table.stdout and "healthy" in table.stdout

        out = status("--json")
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        assert proc.proc is not None and snap["pid"] == proc.proc.pid
        assert snap["ports"][0]["socket"] == str(sock)
        proc.stop()
        assert not ctl.exists()

    gone = subprocess.run(
        [sys.executable, "-m", "vhostd", "status", "--control-socket", str(ctl)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 1 and "cannot read status" in gone.stderr


def test_status_names_guest_macs_the_fdb_and_the_last_error(tmp_sock_dir: Path) -> None:
    """Per port: the guest's MAC (learnt, or from SEND_RARP), the last error with its
    time, memory faults, offered features by name; the switch's MAC table with ages."""
    a, b = tmp_sock_dir / "a.sock", tmp_sock_dir / "b.sock"
    mac_a, mac_b = bytes.fromhex("52540000000a"), bytes.fromhex("52540000000b")

    async def main() -> None:
        async with (
            serving(
                port_config(a, queue_pairs=1),
                port_config(b, "sink", queue_pairs=1),
                control_socket=str(tmp_sock_dir / "c.sock"),
            ) as d,
            Frontend.connect(str(a)) as fa,
            Frontend.connect(str(b)) as fb,
        ):
            await fa.net_setup()
            await fb.net_setup()
            pa, pb = snapshot(d)["ports"]
            assert (pa["mac"], pa["macs"], pb["mac"]) == (None, [], None)
            assert pa["last_error"] is None and pa["memory_faults"] == 0
            assert "VERSION_1" in pa["offered_feature_names"]
            assert "NET_MQ" not in pa["offered_feature_names"]

            frame = b"\xff" * 6 + mac_a + b"\x08\x00" + bytes(46)
            assert len(await fa.send_frames(1, [frame])) == 1
            await fb.send_rarp(mac_b)  # sink mode: nothing is learnt, RARP says it
            with pytest.raises(BackendNack):
                await fb._ack(FrontendRequest.SET_VRING_NUM, VringState(0, 3))
            d.ports["b"].stats.memory_faults += 1  # as the SIGBUS guard counts one
            snap = snapshot(d)
            pa, pb = snap["ports"]
            assert (pa["mac"], pa["macs"]) == ("52:54:00:00:00:0a", ["52:54:00:00:00:0a"])
            assert (pb["mac"], pb["macs"]) == ("52:54:00:00:00:0b", [])
            err = pb["last_error"]
            assert err["kind"] == "bad_vring_num"
            assert (
                err["message"] == "SET_VRING_NUM refused: vring size 3 is not a power of 2 <= 32768"
            )
            assert abs(err["time"] - time.time()) < 60 and 0 <= err["age_seconds"] < 60
            assert pb["memory_faults"] == 1
            (entry,) = snap["fdb"]
            assert entry["mac"] == "52:54:00:00:00:0a" and entry["port"] == "a"
            assert entry["kind"] == "port" and 0 <= entry["age_seconds"] < 60
            assert snap["build"] == {
                "version": buildinfo.version(),
                "python": platform.python_version(),
                "native": buildinfo.native(),
            }

            text = format_status(snap)
            row_a, row_b = text.splitlines()[3:5]
            assert "52:54:00:00:00:0a" in row_a.split() and "52:54:00:00:00:0b" in row_b.split()
            assert row_b.split()[8] == "2"  # ERRORS: the refused request and the memory fault
            assert "  guest MAC: 52:54:00:00:00:0b" in text
            assert "bad_vring_num: SET_VRING_NUM refused: vring size 3" in text
            assert "memory_faults=1" in text
            fdb = format_fdb(snap).splitlines()
            assert fdb[0].split() == ["MAC", "PORT", "AGE"]
            assert fdb[1].split()[:2] == ["52:54:00:00:00:0a", "a"]
            assert fdb[2] == "1 of at most 4096 entries"

        # The connection is gone: its MACs go, the last error stays.
        (_, pb) = snapshot(d)["ports"]
        assert pb["mac"] is None and pb["last_error"]["kind"] == "bad_vring_num"
        assert snapshot(d)["fdb"] == []

    trio.run(main)


def test_version_and_fdb_on_the_command_line(tmp_sock_dir: Path, tmp_path: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "vhostd", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"{buildinfo.describe()}\n"
    assert version.stdout.startswith(f"vhostd {buildinfo.version()} (Python ")
    assert buildinfo.version() != "unknown"  # the package metadata is installed

    sock, ctl = tmp_sock_dir / "vm1.sock", tmp_sock_dir / "control.sock"
    args = ["--socket", str(sock), "--control-socket", str(ctl)]
    with VhostdProcess(args, tmp_path / "vhostd.log").start(wait_for=[sock, ctl]):

        def run(*extra: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "vhostd", *extra, "--control-socket", str(ctl)],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert run("fdb").splitlines() == ["MAC  PORT  AGE", "0 of at most 4096 entries"]
        assert json.loads(run("fdb", "--json")) == []
        both = run("status", "--fdb")
        assert "VRING" in both and both.endswith("0 of at most 4096 entries\n")
