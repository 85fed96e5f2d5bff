"""Hostile virtio-net headers through the whole daemon: dropped, counted, contained.

vhostd runs as a child process inside a fresh network namespace with a TAP
uplink (offloads on, so a header would reach the kernel) and three ports. A
simulated guest that negotiated CSUM and HOST_TSO4/6 but not HOST_ECN floods
(broadcast) frames whose headers lie: an unknown gso_type, gso_size 0,
csum_start/csum_offset outside the frame, hdr_len past it, a "GSO" frame no
larger than gso_size, the ECN bit, a frame over 64 KiB. Each is dropped and
counted by reason; none reaches the other guest or the TAP (the TAP's own
kernel counters do not move); then a good super-frame reaches the guest without
offloads as segments equal byte for byte to hand-built ones, and the TAP whole,
and a new front-end is served.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from protocol.enums import VirtioFeature as VF
from tests.daemon import VhostdProcess
from tests.lab.netns import Netns
from tests.offload_frames import ACK, PSH, SRC, tcp4
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.net import NetHeader, send_frames
from vhostd.control import fetch
from vhostd.offload import F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4

BROADCAST = b"\xff" * 6
TAP = "vhdh0"
MSS = 1448
EVIL_FEATURES = DEFAULT_NET_FEATURES | VF.NET_CSUM | VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns, a TAP)")


def flood(frame: bytes) -> bytes:
    return BROADCAST + frame[6:]


def gso(hdr_len: int = 54, size: int = MSS, gso_type: int = GSO_TCPV4) -> NetHeader:
    return NetHeader(F_NEEDS_CSUM, gso_type, hdr_len, size, 34, 16)


async def from_evil(fe: Frontend, count: int, timeout: float) -> list[bytes]:
    """Frames the guest got from the hostile one (the kernel's own multicast left out)."""
    got: list[bytes] = []
    with trio.move_on_after(timeout):
        while len(got) < count:
            got += [f for f in await fe.recv_frames(0, timeout=0.1) if f[6:12] == SRC]
    return got


def tap_rx_packets(ns: Netns) -> int:
    """Frames vhostd wrote into the kernel (the TAP's rx), one per skb."""
    return int(ns.run(["cat", f"/sys/class/net/{TAP}/statistics/rx_packets"]).stdout)


def port_status(ctl: Path, name: str) -> dict[str, object]:
    for p in fetch(str(ctl))["ports"]:
        if p["name"] == name:
            found: dict[str, object] = p
            return found
    raise KeyError(name)


def test_hostile_headers_are_dropped_by_reason_and_reach_nobody(
    tmp_path: Path, tmp_sock_dir: Path
) -> None:
    ctl = tmp_sock_dir / "control.sock"
    sock = {name: tmp_sock_dir / f"{name}.sock" for name in ("evil", "peer", "new")}
    text = f'control_socket = "{ctl}"\n[[tap]]\nname = "{TAP}"\n'
    for path in sock.values():
        text += f'[[port]]\nsocket = "{path}"\n'
    cfg = tmp_path / "vhostd.toml"
    cfg.write_text(text)

    big = flood(tcp4(os.urandom(20000), csum="partial"))
    small = flood(tcp4(b"s" * 500, csum="partial"))
    hostile: list[tuple[str, bytes, NetHeader]] = [
        ("unknown_gso_type", big, gso(gso_type=9)),
        ("gso_size_zero", big, gso(size=0)),
        ("csum_outside_frame", small, NetHeader(F_NEEDS_CSUM, 0, 0, 0, len(small), 0)),
        ("csum_outside_frame", small, NetHeader(F_NEEDS_CSUM, 0, 0, 0, 34, len(small))),
        ("hdr_len_past_frame", big, gso(hdr_len=0xFFFF)),
        ("gso_not_larger_than_gso_size", small, gso()),
        ("ecn_not_negotiated", big, gso(gso_type=GSO_TCPV4 | GSO_ECN)),
    ]
    too_big = flood(tcp4(os.urandom(70000)[:65000], csum="partial")) + bytes(1000)

    async def main(ns: Netns) -> None:
        async with (
            Frontend.connect(str(sock["evil"])) as evil,
            Frontend.connect(str(sock["peer"])) as peer,
        ):
            await evil.net_setup(features=EVIL_FEATURES)
            await peer.net_setup()  # no GUEST_CSUM/TSO: it needs segments
            peer.post_rx(0, 64)
            tap_before = await trio.to_thread.run_sync(tap_rx_packets, ns)
            for _, frame, hdr in hostile:
                await send_frames(evil, 1, [frame], header=hdr)
            # Over 64 KiB of frame: refused by the ring's size check before its header.
            await send_frames(evil, 1, [too_big], header=gso())
            assert await from_evil(peer, 1, timeout=0.5) == []
            status = await trio.to_thread.run_sync(port_status, ctl, "evil")
            off = status["offload"]
            want: dict[str, int] = {}
            for reason, _, _ in hostile:
                want[reason] = want.get(reason, 0) + 1
            want["frame_too_big"] = 1
            assert off["bad_headers"] == want, off  # type: ignore[index]
            assert status["totals"]["tx"]["drops"] == len(hostile) + 1, status["totals"]  # type: ignore[index]
            assert await trio.to_thread.run_sync(tap_rx_packets, ns) == tap_before

            # The daemon still serves: a good super-frame and a plain frame go through.
            plain = flood(tcp4(b"p" * 100))
            await send_frames(evil, 1, [big], header=gso())
            await send_frames(evil, 1, [plain])
            got = await from_evil(peer, 15, timeout=2.0)
            want_frames = []
            for i, off_ in enumerate(range(0, 20000, MSS)):
                last = off_ + MSS >= 20000
                seg = tcp4(
                    big[54 + off_ : 54 + off_ + MSS],
                    seq=1000 + off_,
                    ip_id=0x1234 + i,
                    flags=ACK | PSH if last else ACK,
                )
                want_frames.append(flood(seg))
            assert got == [*want_frames, plain]
            with trio.fail_after(5):
                while await trio.to_thread.run_sync(tap_rx_packets, ns) < tap_before + 2:
                    await trio.sleep(0.05)
            assert await trio.to_thread.run_sync(tap_rx_packets, ns) == tap_before + 2
            async with Frontend.connect(str(sock["new"])) as new:
                with trio.fail_after(1.0):
                    assert await new.get_features()
            snap = await trio.to_thread.run_sync(fetch, str(ctl))
            (tap,) = snap["taps"]
            assert (tap["gso_tx"], tap["tx_packets"], tap["tx_dropped"]) == (1, 2, 0), tap
            assert port_status(ctl, "peer")["offload"]["segmented"] == 1  # type: ignore[index]

    with Netns() as ns:
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])  # no ND/MLD noise
        proc = VhostdProcess(
            ["--config", str(cfg)], tmp_path / "vhostd.log", wrapper=ns.exec_argv([])
        )
        with proc.start(wait_for=[*sock.values(), ctl]):
            trio.run(main, ns)
            assert proc.proc is not None and proc.proc.poll() is None
        assert "Traceback" not in proc.log(), proc.log()
