"""DPDK's virtio-user on packed rings (``packed_vq=1``) against ``vhostd run``.

testpmd forwards between a pcap port and a virtio-user port on a reflect
port of vhostd: every frame of an input file (numbered, 60 to 1514 bytes)
goes out on a packed TX ring and must come back exactly once, byte for byte
with its MACs swapped, into the output file, with mergeable RX buffers on
and off, in-order, two queue pairs and 64-entry rings (both wrap counters
flip dozens of times). vhostd's status must show RING_PACKED negotiated.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import VhostdProcess
from tests.e2e.vhostd_status import status
from tests.lab.dpdk import Testpmd, VirtioUser
from tests.lab.pcap import read_pcap, write_pcap

pytestmark = pytest.mark.e2e

MAC = "52:54:00:12:34:56"
FRAMES = 3000
RING = 64


def numbered_frames(n: int, seed: int) -> list[bytes]:
    """Frames with unique contents; the source MAC's last byte spreads them over queues."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([60, 64, 128, 511, 1000, 1514])
        dst = bytes.fromhex("020000000001")
        src = bytes.fromhex("02000000") + bytes([i >> 8 & 0xFF, i & 0xFF])
        body = i.to_bytes(4, "big") + rng.randbytes(size - 18)
        out.append(dst + src + b"\x88\xb5" + body)
    return out


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


def port_status(control: Path) -> dict[str, Any]:
    (port,) = status(control)["ports"]
    return port  # type: ignore[no-any-return]


CASES = {
    "mrg": {"mrg_rxbuf": True, "queues": 1},
    "no-mrg": {"mrg_rxbuf": False, "queues": 1},
    "mrg-2qp": {"mrg_rxbuf": True, "queues": 2},
    "no-mrg-2qp": {"mrg_rxbuf": False, "queues": 2},
}


@pytest.mark.parametrize("devargs", CASES.values(), ids=CASES.keys())
def test_every_frame_comes_back_over_packed_rings(
    tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str, devargs: dict[str, Any]
) -> None:
    queues = devargs["queues"]
    sock, control = tmp_sock_dir / "dpdk.sock", tmp_sock_dir / "control.sock"
    frames = numbered_frames(FRAMES, seed=queues * 2 + devargs["mrg_rxbuf"])
    # One input file per queue (net_pcap: one rx_pcap per RX queue), one output per TX queue.
    inputs = [lab_logs / f"in{q}.pcap" for q in range(queues)]
    outputs = [lab_logs / f"out{q}.pcap" for q in range(queues)]
    for q, path in enumerate(inputs):
        write_pcap(path, frames[q::queues])
    pcap = "net_pcap{index}," + ",".join(
        [f"rx_pcap={p}" for p in inputs] + [f"tx_pcap={p}" for p in outputs]
    )
    virtio = VirtioUser(
        sock,
        queues=queues,
        packed_vq=True,
        in_order=True,
        queue_size=RING,
        mac=MAC,
        **{"mrg_rxbuf": devargs["mrg_rxbuf"]},
    )
    args = ["--socket", str(sock), "--mode", "reflect", "--control-socket", str(control)]
    vhostd = VhostdProcess(args, lab_logs / "vhostd.log")
    vhostd.start(wait_for=[sock, control])
    try:
        pmd = Testpmd(
            [virtio, pcap],
            lab_logs,
            forward_mode="io",
            name="testpmd-packed",
            extra_app=("--no-flush-rx",),  # a start would drain the input file unsent
        )
        with pmd:
            pmd.wait_link_up(0)
            # io retry: a full TX ring makes testpmd wait (up to 2 s a burst) instead of
            # dropping the frame; the pcap port reads its file far faster than any ring drains.
            pmd.command_output("set burst tx delay 20 retry 100000")
            pmd.command_output("set fwd io retry")
            pmd.command_output("start")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                port = port_status(control)
                if port["totals"]["rx"]["packets"] >= FRAMES:
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # testpmd writes the last frames out
            port = port_status(control)  # while the front-end is connected
            pmd.stop_forwarding()
            stats = pmd.port_stats()
            assert pmd.running(), pmd.output()[-3000:]
    finally:
        vhostd.stop()
    assert "RING_PACKED" in port["feature_names"], port["feature_names"]
    assert port["queue_faults"] == {}, (port["queue_faults"], vhostd.log()[-3000:])
    assert all(v["failed"] is None for v in port["vrings"]), port["vrings"]
    totals = port["totals"]
    assert totals["tx"]["packets"] == totals["rx"]["packets"] == FRAMES, (totals, stats)
    assert totals["rx"]["drops"] == totals["tx"]["drops"] == 0, totals
    got = Counter(f for path in outputs for f in read_pcap(path))
    want = Counter(swapped(f) for f in frames)
    missing = want - got
    extra = got - want
    assert not missing and not extra, (len(missing), len(extra), stats)
    rings = [v for v in port["vrings"] if v["started"]]
    assert len(rings) == 2 * queues
    assert all(v["packets"] > 0 for v in rings), rings  # every queue pair carried traffic
    # 3000 frames over rings of 64: both wrap counters flipped many times.
    assert FRAMES // queues > 20 * RING
