"""A TAP uplink with offloads on (IFF_VNET_HDR): frames and headers both ways.

The kernel side is a SOCK_SEQPACKET socketpair, one datagram a TAP frame,
with the 12-byte virtio-net header first, as the tun driver reads and writes
them. To the kernel: super-frames and partial checksums go whole with the
header ``check_tx`` accepted; plain frames with a zero header. From the
kernel: headers are judged like a guest's, hostile ones dropped and counted
by reason, and nothing malformed reaches a switch peer. TUNSETOFFLOAD
follows the union of the peers' offloads, set only when it changes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
import trio

from protocol.enums import VirtioFeature as VF
from tests.offload_frames import ACK, PSH, csum_header, gso_header, tcp4, tcp6
from tests.probe import read_all
from vhostd import tap as tap_module
from vhostd.net import Frame
from vhostd.offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    OFFLOAD_FEATURES,
    PLAIN,
    BadHeader,
    VnetHeader,
    check_tx,
    for_receiver,
)
from vhostd.switch import Switch
from vhostd.tap import TUNSETOFFLOAD, TapUplink
from vhostd.tapoffload import TunOffload, peer_flags, tun_offload_flags

GUEST_TSO = VF.NET_GUEST_CSUM | VF.NET_GUEST_TSO4 | VF.NET_GUEST_TSO6
BROADCAST = b"\xff" * 6


class Guest:
    def __init__(self, name: str = "guest", features: int = 0) -> None:
        self.name = name
        self.features = features
        self.got: list[tuple[bytes, VnetHeader]] = []

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        self.got.append((bytes(frame), hdr))

    def flush(self) -> None:
        pass


@pytest.fixture
def tap_pair() -> Iterator[tuple[Switch, TapUplink, socket.socket]]:
    switch = Switch()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    tap = TapUplink("t0", switch)
    tap.fd = ours.detach()
    try:
        yield switch, tap, kernel
    finally:
        if tap.fd >= 0:
            os.close(tap.fd)
        kernel.close()


def test_offloaded_frames_reach_the_kernel_whole_with_their_header(
    tap_pair: tuple[Switch, TapUplink, socket.socket],
) -> None:
    switch, tap, kernel = tap_pair
    src = Guest("src")
    switch.attach(src)
    switch.attach(tap)
    frame = tcp4(os.urandom(30000), csum="partial")
    hdr = check_tx(gso_header(frame, 1448), frame, int(OFFLOAD_FEATURES))
    assert isinstance(hdr, VnetHeader)
    switch.forward(src, frame, hdr)
    # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
    want = struct.pack("<BBHHHHH", F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    assert read_all(kernel) == [want + frame]

    partial = tcp6(b"hello" * 100, csum="partial")
    c = check_tx(csum_header(partial, v6=True), partial, int(VF.NET_CSUM))
    assert isinstance(c, VnetHeader)
    switch.forward(src, partial, c)
    want = struct.pack("<BBHHHHH", F_NEEDS_CSUM, 0, 0, 0, 54, 16, 0)
    assert read_all(kernel) == [want + partial]

    plain = tcp4(b"x" * 100)
    switch.forward(src, plain)
    assert read_all(kernel) == [bytes(12) + plain]
    assert (tap.gso_tx, tap.segmented, tap.csum_completed) == (1, 0, 0)
    assert (tap.tx_packets, tap.tx_bytes) == (3, len(frame) + len(partial) + len(plain))


async def _serve_and_feed(
    switch: Switch, tap: TapUplink, kernel: socket.socket, datagrams: list[bytes]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap.serve)
        await trio.sleep(0)
        for d in datagrams:
            kernel.send(d)
        with trio.fail_after(5):
            while tap.rx_packets < len(datagrams):
                await trio.sleep(0.01)
        tap.cancel_scope.cancel()


def test_frames_from_the_kernel_are_judged_and_hostile_ones_dropped_by_reason(
    tap_pair: tuple[Switch, TapUplink, socket.socket],
) -> None:
    switch, tap, kernel = tap_pair
    peer = Guest("peer", GUEST_TSO)
    switch.attach(peer)
    big = tcp4(os.urandom(20000), csum="partial")
    big6 = tcp6(os.urandom(9000), csum="partial")
    small = tcp4(b"y" * 500, csum="partial")
    plain = tcp4(b"z" * 100)

    def head(flags: int, gso: int, hdr_len: int, size: int, start: int, off: int) -> bytes:
        return struct.pack("<BBHHHHH", flags, gso, hdr_len, size, start, off, 0)

    good = [
        head(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + big,
        head(F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16) + big6,
        head(F_NEEDS_CSUM, 0, 0, 0, 34, 16) + small,
        head(F_DATA_VALID, 0, 0, 0, 0, 0) + plain,
        bytes(12) + plain,
    ]
    hostile = [
        head(F_NEEDS_CSUM, 9, 54, 1448, 34, 16) + big,  # unknown gso_type
        head(F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16) + big,  # gso_size 0
        head(F_NEEDS_CSUM, 0, 0, 0, len(small), 16) + small,  # csum outside
        head(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + small,  # not larger than gso_size
        head(F_NEEDS_CSUM, GSO_TCPV4, 0xFFFF, 1448, 34, 16) + big,  # hdr_len past the frame
    ]
    trio.run(_serve_and_feed, switch, tap, kernel, good + hostile)

    assert [f for f, _ in peer.got] == [big, big6, small, plain, plain]
    assert [h for _, h in peer.got] == [
        VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16),
        VnetHeader(F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16),
        VnetHeader(F_NEEDS_CSUM, 0, 0, 0, 34, 16),
        PLAIN,
        PLAIN,
    ]
    assert tap.gso_rx == 2
    assert dict(tap.bad_headers) == {
        BadHeader.UNKNOWN_GSO_TYPE: 1,
        BadHeader.GSO_SIZE_ZERO: 1,
        BadHeader.CSUM_OUTSIDE: 1,
        BadHeader.GSO_NOT_LARGER: 1,
        BadHeader.HDR_LEN: 1,
    }
    assert tap.rx_bytes == sum(len(d) - 12 for d in good + hostile)


def test_a_peer_without_offloads_gets_kernel_super_frames_segmented(
    tap_pair: tuple[Switch, TapUplink, socket.socket],
) -> None:
    """What a session does for a guest without GUEST_TSO (``Session.send``)."""
    switch, tap, kernel = tap_pair
    got: list[bytes] = []

    class Plain(Guest):
        def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
            got.extend(bytes(f) for f in for_receiver(frame, hdr, 0).frames)

    switch.attach(Plain("old"))
    big = tcp4(os.urandom(5000), csum="partial")
    d = struct.pack("<BBHHHHH", F_NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16, 0) + big
    trio.run(_serve_and_feed, switch, tap, kernel, [d])
    # independent expectation: hand-built segments (ACK on all, PSH on the last)
    want = [
        tcp4(big[54 + off : 54 + off + 1000], seq=1000 + off, ip_id=0x1234 + i, flags=ACK)
        for i, off in enumerate(range(0, 5000, 1000))
    ]
    want[-1] = tcp4(big[54 + 4000 :], seq=5000, ip_id=0x1238, flags=ACK | PSH)
    assert got == want


def test_tun_offload_flags_are_the_union_of_the_peers() -> None:
    assert peer_flags(0) == TunOffload(0)
    assert peer_flags(VF.NET_GUEST_TSO4) == TunOffload(0)  # TSO without CSUM: nothing
    assert peer_flags(VF.NET_GUEST_CSUM) == TunOffload.CSUM
    assert peer_flags(GUEST_TSO | VF.NET_GUEST_ECN) == (
        TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO6 | TunOffload.TSO_ECN
    )
    assert tun_offload_flags([0, VF.NET_GUEST_CSUM | VF.NET_GUEST_TSO4]) == (
        TunOffload.CSUM | TunOffload.TSO4
    )
    assert tun_offload_flags([]) == TunOffload(0)


def test_tunsetoffload_follows_the_peers_and_is_set_only_on_change(
    tap_pair: tuple[Switch, TapUplink, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    switch, tap, _ = tap_pair
    calls: list[int] = []

    def ioctl(fd: int, request: int, arg: int) -> int:
        assert fd == tap.fd and request == TUNSETOFFLOAD
        calls.append(arg)
        return 0

    monkeypatch.setattr(tap_module.fcntl, "ioctl", ioctl)
    switch.watch(tap.update_offloads)
    switch.attach(tap)
    assert calls == []  # no peers: the kernel finishes everything (as set at open)
    tso = Guest("tso", GUEST_TSO)
    csum = Guest("csum", VF.NET_GUEST_CSUM)
    switch.attach(csum)
    switch.attach(tso)
    switch.attach(tso)  # a ring restart: the same features, no ioctl
    switch.detach(csum)
    switch.detach(tso)
    c, t4, t6 = TunOffload.CSUM, TunOffload.TSO4, TunOffload.TSO6
    assert calls == [c, c | t4 | t6, 0]
    assert tap.tun_offload == TunOffload(0)
    switch.attach(tso)
    tap.close()  # a persistent TAP must not keep handing super-frames to the next reader
    assert calls == [c, c | t4 | t6, 0, c | t4 | t6, 0]


def test_offloads_off_writes_bare_frames_and_never_sets_offloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switch = Switch()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap = TapUplink("t0", switch, offloads=False)
    tap.fd = ours.detach()
    monkeypatch.setattr(tap_module.fcntl, "ioctl", lambda *a: pytest.fail("no ioctl"))
    try:
        switch.watch(tap.update_offloads)
        switch.attach(Guest("tso", GUEST_TSO))
        plain = tcp4(b"x" * 100)
        tap.send(plain)
        assert read_all(kernel) == [plain]
    finally:
        os.close(tap.fd)
        kernel.close()
