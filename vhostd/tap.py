"""A TAP uplink: the host kernel's network stack as one more switch port.

Frames the kernel sends out of the TAP interface enter the switch; frames
the switch sends to the uplink are written to the TAP fd. No offloads are
negotiated (no IFF_VNET_HDR), matching what the guests are offered.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct

import trio

from .net import Frame
from .switch import Switch

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
READ_BURST = 64
MAX_FRAME = 65536


class TapUplink:
    """One TAP interface attached to the switch."""

    def __init__(self, name: str, switch: Switch, mtu: int | None = None) -> None:
        self.name = name
        self.switch = switch
        self.mtu = mtu
        self.fd = -1
        self.rx_packets = self.rx_bytes = 0
        self.tx_packets = self.tx_bytes = 0
        self.tx_dropped = 0

    def open(self) -> None:
        """Create (or attach to) the interface and bring it up."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH", self.name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                if self.mtu is not None:
                    fcntl.ioctl(ctl, SIOCSIFMTU, struct.pack("16si", self.name.encode(), self.mtu))
                got = fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", self.name.encode(), 0))
                flags = struct.unpack_from("16sH", got)[1] | IFF_UP
                fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", self.name.encode(), flags))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        log.info("tap %s: up", self.name)

    def send(self, frame: Frame) -> None:
        """Switch -> kernel. A full TAP queue drops the frame (and counts it)."""
        try:
            os.write(self.fd, frame)
        except OSError:
            self.tx_dropped += 1
            return
        self.tx_packets += 1
        self.tx_bytes += len(frame)

    def flush(self) -> None:
        """Writes are already visible to the kernel."""

    async def serve(self) -> None:
        """Kernel -> switch, a burst per wake-up."""
        fd, switch = self.fd, self.switch
        buf = bytearray(MAX_FRAME)
        view = memoryview(buf)
        switch.attach(self)
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                switch.tick()
                for _ in range(READ_BURST):
                    try:
                        n = os.readv(fd, [buf])
                    except BlockingIOError:
                        break
                    self.rx_packets += 1
                    self.rx_bytes += n
                    if n >= 14:
                        switch.forward(self, view[:n])
                switch.flush()
                await trio.lowlevel.checkpoint()
        finally:
            switch.detach(self)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1
