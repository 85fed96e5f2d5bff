"""DPDK's virtio-user as a third-party front-end against ``vhostd run``.

testpmd is the driver; vhostd runs as a process exactly as a user runs it, and
its counters come from ``vhostd status --json``. Counts must agree exactly once
both sides are quiet: vhostd takes every chain the driver makes available, so
after ``stop`` nothing is in flight on a TX ring.

The ``in_order=0`` cases are the regression for a driver crash: vhostd used to
publish the used index with ``struct.pack_into``, which zeroes the index before
writing it; DPDK's non-in-order TX cleanup then freed stale descriptors twice
and segfaulted (free-list head 0x8000). It showed within ~65k packets, so the
sink cases run long enough to wrap the 16-bit ring index several times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import VhostdProcess
from tests.e2e.vhostd_status import status
from tests.lab.dpdk import PortStats, Testpmd, VirtioUser

pytestmark = pytest.mark.e2e

MAC = "52:54:00:12:34:56"
PEER_MAC = "02:00:00:00:00:00"  # testpmd's default destination for port 0


def port_status(control: Path) -> dict[str, Any]:
    ports = status(control)["ports"]
    assert len(ports) == 1, ports
    return ports[0]  # type: ignore[no-any-return]


def wait_counts(
    control: Path, tx: int, rx: int | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll the status until vhostd's totals reach what testpmd counted."""
    deadline = time.monotonic() + timeout
    while True:
        port = port_status(control)
        totals = port["totals"]
        done = totals["tx"]["packets"] >= tx and (rx is None or totals["rx"]["packets"] >= rx)
        if done or time.monotonic() > deadline:
            return port
        time.sleep(0.1)


class Lab:
    """One vhostd process with one port, and the testpmd front-ends driving it."""

    def __init__(self, workdir: Path, sock_dir: Path, mode: str, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.sock = sock_dir / "dpdk.sock"
        self.control = sock_dir / "control.sock"
        args = ["--socket", str(self.sock), "--mode", mode, "--control-socket", str(self.control)]
        self.vhostd = VhostdProcess([*args, *extra], workdir / "vhostd.log")

    def __enter__(self) -> Lab:
        self.vhostd.start(wait_for=[self.sock, self.control])
        return self

    def __exit__(self, *exc: object) -> None:
        self.vhostd.stop()

    def testpmd(self, forward_mode: str, **devargs: Any) -> Testpmd:
        return Testpmd(
            [VirtioUser(self.sock, mac=MAC, **devargs)],
            self.workdir,
            forward_mode=forward_mode,
            txpkts=64,
            lcores="0@(0,1),1@1",
            name=f"virtio-user-{forward_mode}",
        )

    def check_healthy(self, port: dict[str, Any], pmd: Testpmd) -> None:
        assert pmd.running(), f"testpmd died\n{pmd.output()[-3000:]}"
        assert port["queue_faults"] == {}, (port["queue_faults"], self.vhostd.log()[-3000:])
        assert all(v["failed"] is None for v in port["vrings"]), port["vrings"]


@pytest.fixture
def sink_lab(tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str) -> Iterator[Lab]:
    with Lab(lab_logs, tmp_sock_dir, "sink") as lab:
        yield lab


@pytest.fixture
def reflect_lab(tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str) -> Iterator[Lab]:
    with Lab(lab_logs, tmp_sock_dir, "reflect") as lab:
        yield lab


def run_for(pmd: Testpmd, seconds: float, start: str = "start") -> PortStats:
    pmd.wait_link_up()
    pmd.command_output(start)
    time.sleep(seconds)
    pmd.stop_forwarding()
    return pmd.port_stats()[0]


SINK_CASES = {
    "default": {},
    "split-no-mrg": {"packed_vq": False, "mrg_rxbuf": False},
    "mrg": {"mrg_rxbuf": True},
    "in_order=0": {"in_order": False},
    "queues=2": {"queues": 2},
}


@pytest.mark.parametrize("devargs", SINK_CASES.values(), ids=SINK_CASES.keys())
def test_txonly_into_sink_counts_agree(sink_lab: Lab, devargs: dict[str, Any]) -> None:
    """Every frame testpmd sent is counted once by vhostd's TX counters; nobody crashes."""
    with sink_lab.testpmd("txonly", **devargs) as pmd:
        stats = run_for(pmd, 2.5)
        port = wait_counts(sink_lab.control, tx=stats.tx_packets)
        sink_lab.check_healthy(port, pmd)
    tx = port["totals"]["tx"]
    assert stats.tx_packets > 3 * 65536, stats  # the ring index wrapped several times
    assert tx["packets"] == stats.tx_packets
    assert tx["bytes"] == stats.tx_bytes
    assert tx["drops"] == tx["bad_headers"] == 0
    queues = devargs.get("queues", 1)
    tx_rings = [v for v in port["vrings"] if v["direction"] == "tx" and v["started"]]
    assert len(tx_rings) == queues
    assert all(v["packets"] > 0 for v in tx_rings), tx_rings  # every queue pair carried traffic


REFLECT_CASES = {
    "mrg": {"mrg_rxbuf": True},
    "split-no-mrg": {"packed_vq": False, "mrg_rxbuf": False},
    "in_order=0": {"in_order": False},
    "queues=2": {"queues": 2},
}


@pytest.mark.parametrize("devargs", REFLECT_CASES.values(), ids=REFLECT_CASES.keys())
def test_io_loop_through_reflect(reflect_lab: Lab, devargs: dict[str, Any]) -> None:
    """A burst sent once circulates: testpmd io returns what reflect returned, for a while."""
    with reflect_lab.testpmd("io", **devargs) as pmd:
        stats = run_for(pmd, 1.5, start="start tx_first")
        port = wait_counts(reflect_lab.control, tx=stats.tx_packets)
        reflect_lab.check_healthy(port, pmd)
    totals = port["totals"]
    assert stats.rx_packets > 10_000, stats
    assert totals["tx"]["packets"] == stats.tx_packets
    # vhostd delivered each frame it took; testpmd read all but what was in its RX ring at stop.
    assert totals["rx"]["packets"] == totals["tx"]["packets"]
    assert (
        stats.rx_packets
        <= totals["rx"]["packets"]
        <= stats.rx_packets + 256 * devargs.get("queues", 1)
    )


def test_rxonly_gets_each_frame_back_with_macs_swapped(reflect_lab: Lab) -> None:
    """Four bursts of 32 go out once; exactly 128 come back, from the peer to us."""
    with reflect_lab.testpmd("rxonly") as pmd:
        pmd.wait_link_up()
        pmd.command_output("set verbose 1")
        # Verbose packet dumps interleave with the console, even inside the prompt:
        # send without waiting for it, and poll vhostd rather than testpmd.
        pmd.send("start tx_first 4")
        wait_counts(reflect_lab.control, tx=128, rx=128)
        time.sleep(0.5)  # let testpmd read the last frames; nothing more may arrive
        pmd.command_output("set verbose 0")
        pmd.stop_forwarding()
        stats = pmd.port_stats()[0]
        out = pmd.output()
        port = port_status(reflect_lab.control)
        reflect_lab.check_healthy(port, pmd)
    assert stats.tx_packets == 128
    assert stats.rx_packets == 128
    assert port["totals"]["tx"]["packets"] == port["totals"]["rx"]["packets"] == 128
    received = [line for line in out.splitlines() if "src=" in line and "dst=" in line]
    assert received, out[-2000:]
    for line in received:
        assert f"src={PEER_MAC}".upper() in line.upper(), line
        assert f"dst={MAC}".upper() in line.upper(), line


def test_macswap_through_reflect(reflect_lab: Lab) -> None:
    """macswap and reflect swap MACs in turn: the burst keeps circulating."""
    with reflect_lab.testpmd("macswap") as pmd:
        stats = run_for(pmd, 1.0, start="start tx_first")
        port = wait_counts(reflect_lab.control, tx=stats.tx_packets)
        reflect_lab.check_healthy(port, pmd)
    assert stats.rx_packets > 10_000, stats
    assert port["totals"]["tx"]["packets"] == stats.tx_packets


@pytest.mark.parametrize("size", [64, 1518])
def test_rxonly_receives_what_source_generates(
    tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str, size: int
) -> None:
    """vhostd --mode source fills testpmd's RX ring: the count grows, every frame is ``size``."""
    with (
        Lab(lab_logs, tmp_sock_dir, "source", ["--source-size", str(size)]) as lab,
        lab.testpmd("rxonly") as pmd,
    ):
        pmd.wait_link_up()
        pmd.start_forwarding()
        time.sleep(1.0)
        first = pmd.port_stats()[0]
        time.sleep(1.0)
        second = pmd.port_stats()[0]
        pmd.stop_forwarding()
        stats = pmd.port_stats()[0]
        time.sleep(0.2)  # vhostd fills the ring testpmd no longer reads, then stops
        port = port_status(lab.control)
        lab.check_healthy(port, pmd)
    assert 0 < first.rx_packets < second.rx_packets <= stats.rx_packets, (first, second)
    assert stats.rx_bytes == stats.rx_packets * size, stats
    assert stats.rx_errors == 0 and stats.tx_packets == 0, stats
    # vhostd delivered what testpmd read plus at most the one ring (256) it left full.
    rx = port["totals"]["rx"]
    assert 0 <= rx["packets"] - stats.rx_packets <= 256, (rx, stats)
    assert rx["bytes"] == rx["packets"] * size
    assert rx["drops"] == 0
