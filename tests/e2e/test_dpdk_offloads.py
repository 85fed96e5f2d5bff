"""A real DPDK receiver without offloads gets TSO super-frames as exact segments.

A simulated guest (``tests.vusim``) that negotiated CSUM and HOST_TSO4/6 posts TCP
super-frames and a checksum-partial frame into one vhostd switch port. DPDK's
virtio-user is the only other port: testpmd negotiates no GUEST_CSUM/GUEST_TSO (no
offload enabled) and io-forwards everything it receives to a ``net_pcap`` port that
writes a pcap file. Every frame in that file must equal, byte for byte, one built by
``tests.offload_frames`` (hand-written headers and a naive checksum, none of vhostd's
offload code): IPv4 segments with their IDs, lengths and header checksums, IPv6
segments, sequence numbers, PSH on the last segment only, full TCP checksums.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import trio

from protocol.enums import VirtioFeature as VF
from tests.daemon import VhostdProcess
from tests.e2e.vhostd_status import port, status
from tests.lab.dpdk import Testpmd, VirtioUser
from tests.offload_frames import ACK, PSH, csum_header, gso_header, tcp4, tcp6
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.net import NetHeader, send_frames

pytestmark = pytest.mark.e2e

TSO_FEATURES = DEFAULT_NET_FEATURES | VF.NET_CSUM | VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6
DPDK_MAC = "52:54:00:12:34:56"


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (any byte order, microsecond or nano stamps)."""
    data = path.read_bytes()
    magic = data[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    frames = []
    at = 24
    while at + 16 <= len(data):
        _, _, caplen, origlen = struct.unpack_from(order + "IIII", data, at)
        at += 16
        assert caplen == origlen, "truncated capture"
        frames.append(data[at : at + caplen])
        at += caplen
    return frames


def header(raw: bytes) -> NetHeader:
    return NetHeader(*struct.unpack("<BBHHHH", raw))


def expected_segments(payload: bytes, mss: int, v6: bool) -> list[bytes]:
    """Independent expectation: each segment built from scratch by tests.offload_frames."""
    out = []
    for i, off in enumerate(range(0, len(payload), mss)):
        last = off + mss >= len(payload)
        flags = ACK | PSH if last else ACK
        chunk = payload[off : off + mss]
        if v6:
            out.append(tcp6(chunk, seq=1000 + off, flags=flags))
        else:
            out.append(tcp4(chunk, seq=1000 + off, ip_id=0x1234 + i, flags=flags))
    return out


def test_tso_super_frames_reach_a_dpdk_receiver_as_exact_segments(
    tmp_sock_dir: Path, lab_logs: Path, testpmd_binary: str
) -> None:
    tso_sock, dpdk_sock = tmp_sock_dir / "tso.sock", tmp_sock_dir / "dpdk.sock"
    control = tmp_sock_dir / "control.sock"
    pcap = lab_logs / "received.pcap"
    p4 = os.urandom(20000)
    p6 = os.urandom(9000)
    small = b"partial checksum " * 30
    super4 = tcp4(p4, csum="partial")
    super6 = tcp6(p6, csum="partial")
    partial = tcp4(small, csum="partial")
    sent = [
        (super4, header(gso_header(super4, 1448))),
        (super6, header(gso_header(super6, 1428, v6=True))),
        (partial, header(csum_header(partial))),
    ]
    want = [
        *expected_segments(p4, 1448, v6=False),
        *expected_segments(p6, 1428, v6=True),
        tcp4(small),  # the checksum completed
    ]

    args = ["--socket", str(tso_sock), "--socket", str(dpdk_sock)]
    vhostd = VhostdProcess([*args, "--control-socket", str(control)], lab_logs / "vhostd.log")
    pmd = Testpmd(
        [VirtioUser(dpdk_sock, mac=DPDK_MAC), f"net_pcap{{index}},tx_pcap={pcap}"],
        lab_logs,
        forward_mode="io",
        name="virtio-user-pcap",
    )
    with vhostd.start(wait_for=[tso_sock, dpdk_sock, control]), pmd:
        pmd.wait_link_up()
        pmd.start_forwarding()
        negotiated = port(status(control), "dpdk")["feature_names"]
        for feature in ("NET_GUEST_CSUM", "NET_GUEST_TSO4", "NET_GUEST_TSO6"):
            assert feature not in negotiated, negotiated

        async def sender() -> None:
            async with Frontend.connect(str(tso_sock)) as fe:
                await fe.net_setup(features=TSO_FEATURES)
                for frame, hdr in sent:
                    await send_frames(fe, 1, [frame], header=hdr)

        trio.run(sender)
        deadline = time.monotonic() + 20
        while pmd.port_stats()[1].tx_packets < len(want):
            assert time.monotonic() < deadline, pmd.port_stats()
            time.sleep(0.2)
        pmd.stop_forwarding()
        stats = pmd.port_stats()
        final = status(control)
    got = read_pcap(pcap)
    print(f"dpdk rx {stats[0]}, pcap {len(got)} frames; vhostd {port(final, 'dpdk')['offload']}")
    assert stats[0].rx_packets == len(want) and stats[1].tx_packets == len(want), stats
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        first = next((k for k in range(min(len(g), len(w))) if g[k] != w[k]), min(len(g), len(w)))
        assert g == w, f"frame {i} ({len(g)} vs {len(w)} B) differs at byte {first}"
    off = port(final, "dpdk")["offload"]
    assert (off["segmented"], off["segments"], off["csum_completed"]) == (2, 21, 1), off
    assert port(final, "tso")["offload"]["bad_headers"] == {}
