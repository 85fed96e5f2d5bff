"""Checksum and TCP segmentation offloads between real QEMU guests on one vhostd switch.

1. Two guests (one behind a vIOMMU, lazy flushing; once the receiver, once the
   sender) that negotiate every offload: 16 MiB one way arrive intact (md5 in the
   receiving guest) and the guests' eth0 counters show TSO super-frames end to end:
   the sender's TX and the receiver's RX mean at least 8000 bytes per packet (one
   way, so no ACKs of a reverse stream pull the means down), with the GSO frames
   passed whole (nothing segmented).
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
MIN_MEAN = 8000
"""Bytes per packet of a one-way stream's data direction: no MTU-sized frame comes near,
so a mean above it proves super-frames (both directions at once measured 1.8-2.7 KB,
the reverse stream's ACKs included)."""
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
    client_iommu: Iommu | None = None,
    one_way: bool = False,
) -> tuple[GuestResult, GuestResult, dict[str, object], dict[str, object], str]:
    socks = [tmp_sock_dir / "g0.sock", tmp_sock_dir / "g1.sock"]
    control = tmp_sock_dir / "control.sock"
    server, client = tcp_pair(
        socks[0],
        socks[1],
        size=SIZE,
        timeout=TIMEOUT,
        server_iommu=server_iommu,
        client_iommu=client_iommu,
        one_way=one_way,
    )
    server = dataclasses.replace(server, params={**server.params, "size": SIZE})
    client = dataclasses.replace(client, device_args=client_device)
    if one_way:
        # TCP cuts a TSO frame to ~1 ms of its pacing rate (at least tcp_min_tso_segs,
        # 2): a receiver slowed by TCG's vIOMMU emulation held the sender's frames to
        # ~2800 B (15.8 KB with the sender behind the vIOMMU instead). 32 segments let
        # the frame size show what vhostd's path carries rather than TCG's pace.
        client = dataclasses.replace(client, params={**client.params, "tso_segs": 32})
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
    if one_way:  # the client sends, the server receives and checks the md5
        assert r0.tcp_md5_ok and (r0.tcp_sent, r0.tcp_recv) == (0, SIZE), r0
        assert r1.tcp_flow == "send" and r1.tcp_sent == SIZE, r1
    else:
        for r in (r0, r1):
            assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
    assert "Traceback" not in log, log
    return r0, r1, negotiated, final, log


@pytest.mark.parametrize("viommu", ["receiver", "sender"])
def test_tso_super_frames_guest_to_guest_one_behind_a_viommu(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path, viommu: str
) -> None:
    r0, r1, negotiated, final, _ = _run(
        guest_image,
        tmp_sock_dir,
        lab_logs,
        server_iommu=Iommu.LAZY if viommu == "receiver" else None,
        client_iommu=Iommu.LAZY if viommu == "sender" else None,
        one_way=True,
    )
    for name in ("g0", "g1"):
        p = port(negotiated, name)
        for feature in OFFLOADS:
            assert feature in p["feature_names"], (feature, p["feature_names"])
        assert set(OFFLOADS) <= set(p["offload"]["negotiated"]), p["offload"]
    behind = "g0" if viommu == "receiver" else "g1"
    assert "ACCESS_PLATFORM" in port(negotiated, behind)["feature_names"]
    sender, receiver = r1, r0
    print(
        f"sender {sender.nic} tx {per_packet(sender, 'tx'):.0f} B/pkt; "
        f"receiver {receiver.nic} rx {per_packet(receiver, 'rx'):.0f} B/pkt"
    )
    assert per_packet(sender, "tx") >= MIN_MEAN, sender.nic
    assert per_packet(receiver, "rx") >= MIN_MEAN, receiver.nic
    assert receiver.nic["rx_bytes"] > SIZE and sender.nic["tx_bytes"] > SIZE
    for name in ("g0", "g1"):
        f = port(final, name)
        print(name, f["totals"], f["offload"])
        assert_clean(f)
        off = f["offload"]
        assert off["segmented"] == off["csum_completed"] == 0, off
        assert off["bad_headers"] == {}, off
    assert port(final, "g1")["totals"]["tx"]["gso_packets"] > 100, port(final, "g1")["totals"]
    assert port(final, "g0")["totals"]["rx"]["gso_packets"] > 100, port(final, "g0")["totals"]


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
