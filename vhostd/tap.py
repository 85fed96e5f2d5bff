"""A TAP uplink: the host kernel's network stack as one more switch port.

Frames the kernel sends out of the TAP interface enter the switch; frames
the switch sends to the uplink are written to the TAP fd. With offloads on
(the default; ``[[tap]] offloads = false`` turns them off) the TAP is opened
with ``IFF_VNET_HDR``: every frame carries a 12-byte virtio-net header, so
TCP super-frames and checksum-partial frames go to and come from the host
kernel whole. What the kernel may send (``TUNSETOFFLOAD``) follows the union
of what the TAP's switch peers take whole, re-applied when one attaches or
detaches (``tapoffload``); headers from the kernel are judged like a guest's.
Without offloads, frames to the TAP are segmented and checksummed in software.

The interface is persistent (TUNSETPERSIST): it outlives the daemon's fd, so a
restart attaches to the same device and the host's addresses, bridge
membership and MAC stay. A TAP that already exists (``ip tuntap add dev NAME
mode tap [user U]``, or one vhostd made before) is attached to as it is. vhostd
deletes only a TAP it created itself, and only when the configuration no
longer has it (a reload that removes it, or the next start): the names it
created are kept in :class:`CreatedTaps`, a file next to the control socket.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections import Counter
from typing import Any

import trio

from .fastpath import ENABLED as NATIVE
from .fastpath import FrameBurst
from .native import ffi, lib
from .net import Frame
from .offload import (
    GSO_NONE,
    MAX_OFFLOAD_FRAME,
    PLAIN,
    Action,
    BadHeader,
    VnetHeader,
    check_tx,
    for_receiver,
)
from .runtime import SetupError, user_name
from .switch import Switch
from .tapoffload import (
    KERNEL_SENDS,
    KERNEL_TAKES,
    NONE,
    PLAIN_HEADER,
    VNET_HDR_LEN,
    TunOffload,
    header_bytes,
    tun_offload_flags,
)

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFREQ_SIZE = 40  # sizeof(struct ifreq)
READ_BURST = 64
READ_SIZE = VNET_HDR_LEN + MAX_OFFLOAD_FRAME
"""The largest read: a header and the largest frame a header may describe."""
READ_BUFFER = 4 * READ_SIZE
"""Bytes a read burst packs its frames into: at least one frame of the largest size
fits after any three, and a whole burst of MTU-sized frames fits."""


def _attach(name: str, vnet_hdr: bool) -> tuple[int, bool]:
    """An fd attached to TAP ``name`` (created if missing) and whether it was created.

    A created TAP is made persistent at once; one that existed is left as it was.
    ``vnet_hdr``: frames on this fd carry a 12-byte virtio-net header. The flag
    belongs to the attach (TUNSETIFF), not the device, so it need not match
    whatever opened a persistent TAP before. TUNSETOFFLOAD does persist: it is
    set here, to nothing, so an old setting cannot hand this fd super-frames
    before the peers are known (and never, without a header).
    """
    who = f"tap {name}"
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SetupError(
            f"{who}: {TUN_DEVICE} does not exist: load the tun module (modprobe tun); under "
            f"systemd allow it (DeviceAllow={TUN_DEVICE} rw)"
        ) from None
    except OSError as exc:
        raise SetupError(f"{who}: cannot open {TUN_DEVICE}: {exc.strerror}") from None
    created = False
    try:
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError as exc:
            raise SetupError(_attach_problem(name, exc)) from None
        got = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_SIZE))
        created = not struct.unpack_from("16sH", got)[1] & IFF_PERSIST
        if created:
            # Not persistent means nobody else had it: this fd just created it.
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        try:
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as exc:
            fix = "turn them off (offloads = false in its [[tap]])" if vnet_hdr else "a kernel bug?"
            raise SetupError(f"{who}: cannot set its offloads: {exc.strerror}: {fix}") from None
    except BaseException:
        if created:
            _unpersist(fd, name)
        os.close(fd)
        raise
    return fd, created


def _attach_problem(name: str, exc: OSError) -> str:
    who = f"tap {name}"
    if exc.errno == errno.EPERM:
        return (
            f"{who}: not permitted to create or attach it (user {user_name()} lacks "
            "CAP_NET_ADMIN): grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN) or "
            f"pre-create the TAP for this user: ip tuntap add dev {name} mode tap "
            f"user {user_name()}"
        )
    if exc.errno == errno.EBUSY:
        return (
            f"{who}: busy: another process has it open (another vhostd? a QEMU?): stop it or "
            "fix the tap's name="
        )
    if exc.errno == errno.EINVAL:
        return (
            f"{who}: an interface {name} exists and is not a single-queue TAP "
            f"(ip -d link show {name}): remove it or fix the tap's name="
        )
    return f"{who}: cannot create or attach it: {exc.strerror}"


def delete_tap(name: str) -> None:
    """Delete a persistent TAP (one vhostd created) that no fd holds; OSError says why not."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return  # already gone (a reboot, or the administrator)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)


class CreatedTaps:
    """The TAPs this vhostd created, one name a line in a file that survives restarts.

    ``/run`` and TAPs both go at reboot, so the file lives as long as what it lists.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                self.names = {line.strip() for line in f if line.strip()}
        except FileNotFoundError:
            self.names = set()
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror)
            self.names = set()

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.add(name)
            self._save()

    def discard(self, name: str) -> None:
        if name in self.names:
            self.names.discard(name)
            self._save()

    def _save(self) -> None:
        try:
            if not self.names:
                os.unlink(self.path)
                return
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(f"{n}\n" for n in sorted(self.names)))
            os.replace(tmp, self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)


class TapUplink:
    """One TAP interface attached to the switch."""

    def __init__(
        self, name: str, switch: Switch, mtu: int | None = None, *, offloads: bool = True
    ) -> None:
        self.name = name
        self.switch = switch
        self.mtu = mtu
        self.offloads = offloads
        """Open with IFF_VNET_HDR: offloaded frames go to and come from the kernel whole."""
        self.fd = -1
        self.created = False
        """This uplink's open() created the interface (it did not exist before)."""
        self.rx_packets = self.rx_bytes = 0
        self.tx_packets = self.tx_bytes = 0
        self.tx_dropped = 0
        self.segmented = self.segments = self.csum_completed = 0
        """Offloaded frames from guests finished in software for the kernel."""
        self.gso_tx = self.gso_rx = 0
        """GSO super-frames written to / read from the kernel whole."""
        self.bad_headers: Counter[BadHeader] = Counter()
        """Frames from the kernel whose header was refused (dropped), by reason."""
        self.features = KERNEL_TAKES if offloads else 0
        """The offloads the kernel takes on this TAP, as virtio GUEST_* feature bits."""
        self.tun_offload = NONE
        """What TUNSETOFFLOAD last asked the kernel to leave undone (``tapoffload``)."""
        self.vnet_len = VNET_HDR_LEN if offloads else 0
        """Bytes of virtio-net header before each frame on the fd (0: no IFF_VNET_HDR)."""
        self.cancel_scope = trio.CancelScope()

    c_kind: int = lib.VHOSTD_SW_TAP
    """What this uplink is to the C switch (``fastswitch.CPort``): an fd it writes to."""

    def c_prepare(self, port: Any) -> bool:
        """Let C write this burst's frames for the uplink straight to the fd."""
        if self.fd < 0:
            return False
        port.fd, port.vnet_len, port.features = self.fd, self.vnet_len, self.features
        return True

    def c_fill(self, port: Any) -> bool:
        """A TAP never waits for a translation."""
        return False

    def c_finish(self, port: Any) -> None:
        """Take the counters of what C wrote (and what the kernel refused)."""
        if port.packets or port.dropped:
            self.tx_packets += port.packets
            self.tx_bytes += port.bytes
            self.tx_dropped += port.dropped
            self.gso_tx += port.gso
            port.packets = port.bytes = port.dropped = port.gso = 0

    def open(self) -> None:
        """Create (or attach to) the interface and bring it up; SetupError says why not."""
        fd, created = _attach(self.name, self.offloads)
        try:
            self._configure()
        except BaseException:
            if created:
                _unpersist(fd, self.name)
            os.close(fd)
            raise
        self.fd, self.created = fd, created
        self.tun_offload = NONE

    def update_offloads(self) -> None:
        """Set TUNSETOFFLOAD to the union of the peers' offloads, if it changed.

        Called by the switch after every attach and detach. A failure keeps
        the old flags (still correct: whatever the kernel sends is judged and,
        where a peer cannot take it, finished in software) and is logged.
        """
        if not self.offloads or self.fd < 0:
            return
        flags = tun_offload_flags(
            int(getattr(ep, "features", 0)) for ep in self.switch.endpoints if ep is not self
        )
        if flags == self.tun_offload:
            return
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, int(flags))
        except OSError as exc:
            log.warning("tap %s: cannot set offloads %s: %s", self.name, flags, exc.strerror)
            return
        log.info("tap %s: the kernel may send %s", self.name, _flag_names(flags))
        self.tun_offload = flags

    def _configure(self) -> None:
        """MTU and IFF_UP, each set only when it differs: an up TAP pre-created with
        the right MTU needs no CAP_NET_ADMIN."""
        name = self.name.encode()
        step = "bring it up"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                if self.mtu is not None:
                    got = fcntl.ioctl(ctl, SIOCGIFMTU, struct.pack("16si", name, 0))
                    if struct.unpack_from("16si", got)[1] != self.mtu:
                        step = f"set its mtu to {self.mtu}"
                        fcntl.ioctl(ctl, SIOCSIFMTU, struct.pack("16si", name, self.mtu))
                got = fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", name, 0))
                flags = struct.unpack_from("16sH", got)[1]
                if not flags & IFF_UP:
                    step = "bring it up"
                    fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", name, flags | IFF_UP))
        except OSError as exc:
            fix = (
                f"grant CAP_NET_ADMIN or do it beforehand (ip link set {self.name} "
                f"{'mtu ' + str(self.mtu) + ' ' if self.mtu is not None else ''}up)"
            )
            raise SetupError(f"tap {self.name}: cannot {step}: {exc.strerror}: {fix}") from None

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        """Switch -> kernel. A full TAP queue drops the frame (and counts it).

        Offloads the TAP does not take are finished here (``offload``); with
        offloads on, only headers ``check_tx`` accepted are ever written, so
        the kernel's ``virtio_net_hdr_to_skb`` never sees a malformed one.
        """
        if hdr is PLAIN:
            self._write(frame, PLAIN_HEADER)
            return
        out = for_receiver(frame, hdr, self.features)
        if out.action is Action.SEGMENTED:
            self.segmented += 1
            self.segments += len(out.frames)
        elif out.action is Action.CSUM_COMPLETED:
            self.csum_completed += 1
        elif out.action is Action.GSO_WHOLE:
            self.gso_tx += 1
        head = header_bytes(out.hdr)
        for f in out.frames:
            self._write(f, head)

    def _write(self, frame: Frame, head: bytes) -> None:
        try:
            if self.vnet_len:
                os.writev(self.fd, (head, frame))
            else:
                os.write(self.fd, frame)
        except OSError:
            self.tx_dropped += 1
            return
        self.tx_packets += 1
        self.tx_bytes += len(frame)

    def flush(self) -> None:
        """Writes are already visible to the kernel."""

    async def serve(self) -> None:
        """Kernel -> switch, a burst per wake-up, until close()."""
        with self.cancel_scope:
            await self._serve()

    async def _serve(self) -> None:
        switch = self.switch
        switch.watch(self.update_offloads)
        switch.attach(self)
        try:
            await (self._serve_bursts() if NATIVE else self._serve_frames())
        finally:
            switch.unwatch(self.update_offloads)
            switch.detach(self)

    async def _serve_bursts(self) -> None:
        """Each readable event: one C call reads up to READ_BURST frames, one switches them."""
        fd, switch = self.fd, self.switch
        buf = ffi.new("uint8_t[]", READ_BUFFER)
        frames = ffi.new("struct vhostd_frame[]", READ_BURST)
        nbytes = ffi.new("uint64_t *")
        nframes = ffi.new("uint32_t *")
        room = READ_SIZE
        while True:
            await trio.lowlevel.wait_readable(fd)
            switch.tick()
            reads = lib.vhostd_tap_read(
                fd, buf, READ_BUFFER, room, READ_BURST, self.vnet_len, frames, nbytes, nframes
            )
            self.rx_packets += reads
            self.rx_bytes += nbytes[0]
            n = nframes[0]
            if n:
                self._switch_burst(frames, n)
                switch.flush()
            await trio.lowlevel.checkpoint()

    def _switch_burst(self, frames: Any, n: int) -> None:
        """Hand a read burst to the switch; frames with an offload header go one by one.

        Only a TAP opened with IFF_VNET_HDR (``vnet_len``) carries headers, each
        judged like a guest's (``check_tx``); the runs of plain frames between
        them still go as bursts, in order.
        """
        switch, start = self.switch, 0
        for k in range(n):
            vnet = frames[k].vnet
            if vnet == ffi.NULL:
                continue
            if k > start:
                switch.forward_burst(self, FrameBurst(frames + start, k - start))
            start = k + 1
            frame = memoryview(ffi.buffer(frames[k].ptr, frames[k].len))
            hdr = check_tx(ffi.buffer(vnet, 10)[:], frame, KERNEL_SENDS)
            if isinstance(hdr, BadHeader):
                self.bad_headers[hdr] += 1
                continue
            if hdr.gso_type != GSO_NONE:
                self.gso_rx += 1
            switch.forward(self, frame, hdr)
        if n > start:
            switch.forward_burst(self, FrameBurst(frames + start, n - start))

    async def _serve_frames(self) -> None:
        """The reference: one read and one ``Switch.forward`` per frame."""
        fd, switch = self.fd, self.switch
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        skip = self.vnet_len
        while True:
            await trio.lowlevel.wait_readable(fd)
            switch.tick()
            for _ in range(READ_BURST):
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    break
                self.rx_packets += 1
                if n < skip:
                    continue
                self.rx_bytes += n - skip
                if n < skip + 14:
                    continue
                frame = view[skip:n]
                if skip and (buf[0] or buf[1]):  # flags or gso_type: an offload
                    hdr = check_tx(view[:10], frame, KERNEL_SENDS)
                    if isinstance(hdr, BadHeader):
                        self.bad_headers[hdr] += 1
                        continue
                    if hdr.gso_type != GSO_NONE:
                        self.gso_rx += 1
                    switch.forward(self, frame, hdr)
                else:
                    switch.forward(self, frame)
            switch.flush()
            await trio.lowlevel.checkpoint()

    def close(self, *, delete: bool = False) -> None:
        """Detach. The interface stays (persistent) unless ``delete``: then it goes
        with this fd, but only if nothing else still holds it."""
        self.cancel_scope.cancel()
        if self.fd >= 0:
            if self.tun_offload:
                # A persistent TAP keeps its offloads: whoever attaches next without a
                # virtio-net header must not be handed super-frames.
                try:
                    fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
                except OSError as exc:
                    log.warning("tap %s: cannot clear its offloads: %s", self.name, exc.strerror)
                self.tun_offload = NONE
            if delete:
                _unpersist(self.fd, self.name)
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1


def _unpersist(fd: int, name: str) -> None:
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except OSError as exc:
        log.warning("tap %s: cannot make it non-persistent: %s; it stays", name, exc.strerror)


def _flag_names(flags: TunOffload) -> str:
    return "|".join(f.name or "" for f in TunOffload if f & flags) or "nothing (it finishes all)"
