"""Offload metadata through the switch: each receiver gets what it can take.

A TAP uplink with offloads off (no IFF_VNET_HDR) is a receiver without them: a flooded
TSO super-frame reaches it as byte-exact segments and a partial checksum
completed, counted; plain frames pass untouched.
"""

from __future__ import annotations

import os
import socket

from protocol.enums import VirtioFeature as VF
from tests.offload_frames import csum_header, gso_header, tcp4
from tests.probe import read_all
from vhostd.net import Frame
from vhostd.offload import OFFLOAD_FEATURES, PLAIN, VnetHeader, check_tx, segment
from vhostd.switch import Switch
from vhostd.tap import TapUplink


class Guest:
    name = "guest"

    def __init__(self) -> None:
        self.got: list[tuple[bytes, VnetHeader]] = []

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        self.got.append((bytes(frame), hdr))

    def flush(self) -> None:
        pass


def _tap(switch: Switch) -> tuple[TapUplink, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap = TapUplink("t0", switch, offloads=False)
    tap.fd = ours.detach()
    switch.attach(tap)
    return tap, theirs


def test_a_flooded_super_frame_is_segmented_for_the_tap_and_whole_for_a_tso_endpoint() -> None:
    switch = Switch()
    src, other = Guest(), Guest()
    switch.attach(src)
    switch.attach(other)
    tap, kernel = _tap(switch)
    try:
        frame = tcp4(os.urandom(20000), csum="partial")
        hdr = check_tx(gso_header(frame, 1448), frame, int(OFFLOAD_FEATURES))
        assert isinstance(hdr, VnetHeader)
        switch.forward(src, frame, hdr)  # unknown destination: flooded
        assert other.got == [(frame, hdr)]  # an endpoint that decides for itself
        assert read_all(kernel) == segment(frame, hdr)
        assert (tap.segmented, tap.segments, tap.tx_packets) == (1, 14, 14)

        partial = tcp4(b"hello" * 100, csum="partial")
        c = check_tx(csum_header(partial), partial, int(VF.NET_CSUM))
        assert isinstance(c, VnetHeader)
        switch.forward(src, partial, c)
        assert read_all(kernel) == [tcp4(b"hello" * 100)]
        assert tap.csum_completed == 1

        plain = tcp4(b"x" * 100)
        switch.forward(src, plain)
        assert read_all(kernel) == [plain]
    finally:
        os.close(tap.fd)
        kernel.close()
