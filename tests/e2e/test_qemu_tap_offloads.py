"""TCP offloads across the TAP uplink: super-frames to and from the host kernel whole.

A guest (every offload negotiated) and the host end of a TAP inside a test network
namespace move 16 MiB of random data each way at once over TCP (md5 checked at both
ends). With TAP offloads on (IFF_VNET_HDR, the default), the TAP's own kernel counters
(/sys/class/net/<tap>/statistics, one packet per skb) show frames far above any MTU
frame in both directions, and vhostd counts the GSO frames it passed whole each way.
The same run with ``offloads = false`` is the control: the guest's super-frames are
cut in software for the kernel (counted) and the kernel sends only MTU frames, so the
same measure stays at or below 1514 bytes per packet.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, port, start_vhostd, status, wait_status
from tests.lab.assets import GuestImage
from tests.lab.netns import Netns, tcp_peer_result
from tests.lab.qemu import Guest, GuestConfig

pytestmark = pytest.mark.e2e

SIZE = 16 << 20
TAP = "vhd0"
HOST = "10.0.0.2"
MTU_FRAME = 1514
"""No frame of a 1500-byte MTU is larger (the TAP counts frames without the vnet header)."""


def tap_counters(netns: Netns) -> dict[str, int]:
    out = {}
    for name in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets"):
        done = netns.run(["cat", f"/sys/class/net/{TAP}/statistics/{name}"])
        out[name] = int(done.stdout)
    return out


def wait_link(netns: Netns, dev: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while netns.run(["ip", "link", "show", dev], check=False).returncode != 0:
        assert time.monotonic() < deadline, f"vhostd did not create {dev} in {netns.name}"
        time.sleep(0.1)


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "no-offloads"])
def test_tcp_both_ways_over_the_tap_with_gso_frames(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path, netns: Netns, offloads: bool
) -> None:
    sock = tmp_sock_dir / "g.sock"
    control = tmp_sock_dir / "control.sock"
    config = tmp_sock_dir / "vhostd.toml"
    config.write_text(f'[[tap]]\nname = "{TAP}"\noffloads = {str(offloads).lower()}\n')
    guest = GuestConfig(  # it connects to the host: upload on 5301, download on 5302
        socket=sock,
        mac="52:54:00:00:00:03",
        role="tcp-client",
        ip="10.0.0.3/24",
        peer=HOST,
        # 32: TSO frames sized by what the path carries, not by TCG's pace
        # (tests/e2e/test_qemu_offloads.py; a run without it sent 2.4 KB frames).
        params={"timeout": 300, "port": 5301, "count": 10, "size": SIZE, "tso_segs": 32},
    )
    vhostd = start_vhostd(
        [sock], control, lab_logs / "vhostd.log", "--config", str(config),
        wrapper=netns.exec_argv([]),
    )  # fmt: skip
    with vhostd:
        wait_link(netns, TAP)
        netns.configure(TAP, f"{HOST}/24")
        listener = netns.tcp_peer("server", HOST, port=5301, size=SIZE, timeout=300)
        with Guest(guest_image, guest, lab_logs, "g") as g:
            g.wait_for(r"VHOSTD-READY", timeout=120)
            if offloads:  # the guest takes TSO whole: the kernel may leave it to vhostd
                during = wait_status(
                    control, lambda s: bool(s["taps"][0]["tun_offload"]), "TUNSETOFFLOAD set"
                )
            else:
                during = status(control)
            before = tap_counters(netns)
            r = g.result(timeout=400)
            after = tap_counters(netns)
            host = tcp_peer_result(listener, timeout=60)
        # The guest is gone; its session's detach resets TUNSETOFFLOAD (wait for it).
        final = wait_status(control, lambda s: s["taps"][0]["tun_offload"] == [], "detach")
    log = vhostd.log()

    assert r.passed, (r, g.serial())
    assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
    assert host.get("md5_ok") is True and host.get("recv") == SIZE, host
    d = {k: after[k] - before[k] for k in after}
    to_kernel = d["rx_bytes"] / max(d["rx_packets"], 1)  # the TAP's rx: vhostd -> kernel
    from_kernel = d["tx_bytes"] / max(d["tx_packets"], 1)
    print(f"offloads={offloads} tap {d}: to kernel {to_kernel:.0f} B/pkt, "
          f"from kernel {from_kernel:.0f} B/pkt; guest nic {r.nic}")  # fmt: skip
    assert d["rx_bytes"] > SIZE and d["tx_bytes"] > SIZE, d
    (tap,) = final["taps"]
    print("tap status", tap)
    assert tap["offloads"] is offloads
    assert tap["bad_headers"] == {}, tap
    assert_clean(port(final, "g"))
    assert "Traceback" not in log, log
    assert tap["tun_offload"] == [], tap  # the guest left: nobody takes offloads whole
    if offloads:
        assert {"CSUM", "TSO4", "TSO6"} <= set(during["taps"][0]["tun_offload"]), during
        # Both directions carry ACKs of the other stream too: a mean above the largest
        # MTU-sized frame is what only super-frames give (runs: 2.4-15 KB).
        assert to_kernel > MTU_FRAME, d
        assert from_kernel > MTU_FRAME, d
        assert tap["gso_tx"] > 100 and tap["gso_rx"] > 100, tap
        assert tap["segmented"] == 0, tap
        assert port(final, "g")["offload"]["segmented"] == 0
    else:
        assert during["taps"][0]["tun_offload"] == [], during
        assert to_kernel <= MTU_FRAME and from_kernel <= MTU_FRAME, d
        assert tap["gso_tx"] == tap["gso_rx"] == 0, tap
        assert tap["segmented"] > 100, tap  # the guest still sends super-frames
