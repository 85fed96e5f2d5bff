"""Checksum and TCP segmentation offloads between real QEMU guests on one vhostd switch.

1. Two guests (the server behind a vIOMMU, lazy flushing) that negotiate every
   offload: 16 MiB each way arrive intact (md5 in the guests) and both guests'
   eth0 counters show TSO super-frames end to end: at least 8000 bytes per packet
   sent and received, with the GSO frames passed whole (nothing segmented).
2. A TSO sender and a receiver whose device has GUEST_CSUM/GUEST_TSO off: vhostd
   segments and checksums every super-frame for it (counted), the stream is intact
   (md5; the receiving guest's kernel checks every TCP/IP checksum) and the receiver
   gets only MTU-sized frames while the sender still sends super-frames.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, port, start_vhostd, status
from tests.lab.assets import GuestImage
from tests.lab.qemu import Guest, GuestResult, Iommu, tcp_pair

pytestmark = pytest.mark.e2e

SIZE = 16 << 20
TIMEOUT = 400
OFFLOADS = tuple(
    f"NET_{n}" for n in ("CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "GUEST_TSO4", "GUEST_TSO6")
)
MIN_MEAN = 1514
"""Bytes per packet, ACKs included: no MTU-sized frame is larger, so a mean above it proves
super-frames (runs measured 1.8-2.7 KB; one-way streams would show their real size)."""
NO_GUEST_OFFLOADS = ",guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off"


def per_packet(r: GuestResult, direction: str) -> float:
    return r.nic[f"{direction}_bytes"] / max(r.nic[f"{direction}_packets"], 1)


def _bit(r: GuestResult, bit: int) -> bool:
    return len(r.features) > bit and r.features[bit] == "1"


def _run(
    guest_image: GuestImage,
    tmp_sock_dir: Path,
    lab_logs: Path,
    client_device: str = "",
    server_iommu: Iommu | None = None,
) -> tuple[GuestResult, GuestResult, dict[str, object], dict[str, object], str]:
    socks = [tmp_sock_dir / "g0.sock", tmp_sock_dir / "g1.sock"]
    control = tmp_sock_dir / "control.sock"
    server, client = tcp_pair(
        socks[0], socks[1], size=SIZE, timeout=TIMEOUT, server_iommu=server_iommu
    )
    server = dataclasses.replace(server, params={**server.params, "size": SIZE})
    client = dataclasses.replace(client, device_args=client_device)
    with (
        start_vhostd(socks, control, lab_logs / "vhostd.log") as vhostd,
        Guest(guest_image, server, lab_logs, "server") as g0,
        Guest(guest_image, client, lab_logs, "client") as g1,
    ):
        g0.wait_for(r"VHOSTD-READY", timeout=120)
        g1.wait_for(r"VHOSTD-READY", timeout=120)
        negotiated = status(control)
        r1 = g1.result(timeout=TIMEOUT + 60)
        r0 = g0.result(timeout=120)
        final = status(control)
    log = vhostd.log()
    assert r1.passed, (r1, g1.serial())
    assert r0.passed, (r0, g0.serial())
    for r in (r0, r1):
        assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
    assert "Traceback" not in log, log
    return r0, r1, negotiated, final, log


def test_tso_super_frames_guest_to_guest_one_behind_a_viommu(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    r0, r1, negotiated, final, _ = _run(
        guest_image, tmp_sock_dir, lab_logs, server_iommu=Iommu.LAZY
    )
    for name in ("g0", "g1"):
        p = port(negotiated, name)
        for feature in OFFLOADS:
            assert feature in p["feature_names"], (feature, p["feature_names"])
        assert set(OFFLOADS) <= set(p["offload"]["negotiated"]), p["offload"]
    assert "ACCESS_PLATFORM" in port(negotiated, "g0")["feature_names"]
    for r in (r0, r1):
        print(f"guest nic {r.nic} tx {per_packet(r, 'tx'):.0f} B/pkt rx {per_packet(r, 'rx'):.0f}")
        # Both streams run at once, so these means include every pure ACK; without
        # offloads they are about 1500 bytes (1510 per frame of data, ACKs below).
        assert per_packet(r, "tx") >= MIN_MEAN, r.nic
        assert per_packet(r, "rx") >= MIN_MEAN, r.nic
    for name in ("g0", "g1"):
        f = port(final, name)
        print(name, f["totals"], f["offload"])
        assert_clean(f)
        off = f["offload"]
        assert off["segmented"] == off["csum_completed"] == 0, off
        assert off["bad_headers"] == {}, off
        assert f["totals"]["tx"]["gso_packets"] > 100, f["totals"]
        assert f["totals"]["rx"]["gso_packets"] > 100, f["totals"]


def test_tso_sender_to_a_receiver_without_offloads_gets_segments(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    r0, r1, negotiated, final, _ = _run(
        guest_image, tmp_sock_dir, lab_logs, client_device=NO_GUEST_OFFLOADS
    )
    plain = port(negotiated, "g1")
    assert "NET_GUEST_TSO4" not in plain["feature_names"]
    assert "NET_GUEST_CSUM" not in plain["feature_names"]
    assert "NET_HOST_TSO4" in plain["feature_names"]  # it may still send super-frames
    assert not _bit(r1, 1) and not _bit(r1, 7), r1.features
    print(f"server {r0.nic} client {r1.nic}")
    # The TSO guest sends super-frames; the receiver without offloads gets MTU frames.
    assert per_packet(r0, "tx") >= 8000, r0.nic
    assert per_packet(r1, "rx") <= 1514, r1.nic
    f = port(final, "g1")
    assert_clean(f)
    off = f["offload"]
    assert off["segmented"] > 100 and off["segments"] >= SIZE // 1514, off
    assert off["bad_headers"] == {}, off
    assert f["totals"]["rx"]["gso_packets"] == 0, f["totals"]
    # The other direction: the receiver with offloads gets the client's super-frames whole.
    assert port(final, "g0")["offload"]["segmented"] == 0
