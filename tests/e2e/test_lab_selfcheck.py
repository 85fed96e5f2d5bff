"""The lab proves itself against DPDK's net_vhost before vhostd exists.

If these fail, the lab (or the machine) is broken, not vhostd: run them first when an
interoperability test fails mysteriously.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.lab.assets import GuestImage
from tests.lab.dpdk import Testpmd, VhostBackend, VirtioUser
from tests.lab.netns import Netns, tcp_peer_result
from tests.lab.qemu import Guest, GuestConfig, Iommu, tcp_pair

pytestmark = pytest.mark.e2e


def test_two_guests_through_net_vhost_io(
    guest_image: GuestImage, testpmd_binary: str, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    """Ping with no loss, then 8 MiB each way over TCP with md5 checks, guest to guest."""
    socks = [tmp_sock_dir / "g0.sock", tmp_sock_dir / "g1.sock"]
    ports = [VhostBackend(s) for s in socks]
    with Testpmd(ports, lab_logs, forward_mode="io", lcores="0@(0,1),1@1") as pmd:
        pmd.start_forwarding()
        server, client = tcp_pair(socks[0], socks[1], size=8 << 20, timeout=150)
        with (
            Guest(guest_image, server, lab_logs, "server") as g0,
            Guest(guest_image, client, lab_logs, "client") as g1,
        ):
            r1 = g1.result(timeout=240)
            r0 = g0.result(timeout=60)
        stats = pmd.port_stats()

    assert r1.passed, (r1, g1.serial())
    assert r0.passed, (r0, g0.serial())
    assert r1.ping_loss == 0.0
    for r in (r0, r1):
        assert r.tcp_md5_ok
        assert r.tcp_sent == r.tcp_recv == 8 << 20
        assert r.dmar_faults == 0
    # io mode forwards each port's RX to the other port's TX; a slow (TCG) guest's full
    # RX ring makes net_vhost drop some, which TCP retransmits.
    for a, b in ((0, 1), (1, 0)):
        assert stats[a].rx_packets > 5000, stats
        assert stats[a].rx_packets * 0.9 <= stats[b].tx_packets <= stats[a].rx_packets, stats


def test_virtio_user_txonly_to_net_vhost_rxonly(
    testpmd_binary: str, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    """Front-end TX and back-end RX counters agree up to what can be in flight."""
    sock = tmp_sock_dir / "vu.sock"
    queue_size = 256
    backend = Testpmd(
        [VhostBackend(sock)], lab_logs, forward_mode="rxonly", lcores="0@(0,1),1@0", name="vhost"
    )
    frontend = Testpmd(
        [VirtioUser(sock, queue_size=queue_size)],
        lab_logs,
        forward_mode="txonly",
        txpkts=64,
        lcores="0@(0,1),1@1",
        name="virtio-user",
    )
    with backend, frontend:
        frontend.wait_link_up(0)
        backend.wait_link_up(0)
        backend.start_forwarding()
        frontend.start_forwarding()
        time.sleep(2.0)
        frontend.stop_forwarding()
        time.sleep(0.5)  # the back-end drains what is still in the ring
        backend.stop_forwarding()
        tx = frontend.port_stats()[0]
        rx = backend.port_stats()[0]

    assert tx.tx_packets > 100_000, tx
    assert 0 <= tx.tx_packets - rx.rx_packets <= queue_size, (tx, rx)
    assert rx.rx_bytes == rx.rx_packets * 64


def test_guest_to_tap_in_netns(
    guest_image: GuestImage, testpmd_binary: str, tmp_sock_dir: Path, lab_logs: Path, netns: Netns
) -> None:
    """Guest <-> net_vhost <-> testpmd io <-> net_tap in a netns <-> host TCP peer.

    Proves the host-side half of the lab (namespace, TAP addressing, tcp_peer framing)
    that the vhostd TAP tests use.
    """
    sock = tmp_sock_dir / "tap.sock"
    pmd = Testpmd(
        [VhostBackend(sock), "net_tap{index},iface=vtap0"],
        lab_logs,
        forward_mode="io",
        wrapper=tuple(netns.exec_argv([])),
        name="tap-testpmd",
    )
    with pmd:
        netns.configure("vtap0", "10.0.0.2/24")
        pmd.start_forwarding()
        config = GuestConfig(socket=sock, role="tcp-client", params={"timeout": 120})
        with Guest(guest_image, config, lab_logs, "tap-guest") as guest:
            peer = netns.tcp_peer("server", "10.0.0.2", timeout=150)
            guest.wait_for(r"VHOSTD-READY", timeout=90)
            netns.wait_reachable("10.0.0.1", timeout=60)
            assert netns.ping("10.0.0.1", count=5) == 0.0
            result = guest.result(timeout=180)
            host = tcp_peer_result(peer, timeout=30)

    assert result.passed, (result, guest.serial())
    assert result.tcp_md5_ok and result.tcp_recv == 8 << 20
    assert host == {**host, "md5_ok": True, "recv": 8 << 20}


def test_viommu_guest_against_net_vhost(
    guest_image: GuestImage, testpmd_binary: str, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    """The vIOMMU wiring boots and negotiates with net_vhost iommu-support=1.

    Only setup is checked: DPDK 22.11 drops bursts on IOTLB misses (strict) and mishandles
    flush-all (lazy), so traffic through it under a vIOMMU is not a lab property.
    """
    sock = tmp_sock_dir / "iommu.sock"
    with Testpmd([VhostBackend(sock, iommu_support=True)], lab_logs, "rxonly") as pmd:
        pmd.start_forwarding()
        config = GuestConfig(socket=sock, role="idle", iommu=Iommu.STRICT, params={"timeout": 5})
        with Guest(guest_image, config, lab_logs, "iommu-guest") as guest:
            guest.wait_for(r"DMAR: IOMMU enabled", timeout=60)
            guest.wait_for(r"VHOSTD-READY", timeout=60)
            pmd.wait_link_up(0)
            result = guest.result(timeout=90)
    assert result.passed, (result, guest.serial())
    assert result.dmar_faults == 0
