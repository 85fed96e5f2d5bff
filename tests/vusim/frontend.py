"""The vhost-user front-end: QEMU's side of the socket, plus the guest driver.

Behaves like QEMU where a back-end can tell the difference: replies are
awaited on the main channel under one lock (so a back-end that blocks the
main channel on a MISS deadlocks here exactly as it would with QEMU); MISS
is answered with an UPDATE on the *main* channel with NEED_REPLY; an
unmapped IOVA gets no answer.  Every wait has a deadline, so a broken
back-end fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from protocol import (
    BackendRequest,
    DeviceStatus,
    FrontendRequest,
    HeaderFlag,
    IotlbMsg,
    IotlbType,
    LogInfo,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringFd,
    VringState,
    encode_reply,
    encode_request,
)

from . import net
from .channel import Channel, ChannelClosed
from .dirtylog import DirtyBitmap
from .dma import Dma, IommuDma, PhysicalDma
from .guestram import GuestRam, RamRegion
from .packed import PackedRing
from .rings import Completion, SplitRing
from .viommu import Direction, MissMode, VIommu

F = FrontendRequest
ALWAYS_REPLIED = frozenset(
    {
        F.GET_FEATURES,
        F.GET_PROTOCOL_FEATURES,
        F.GET_VRING_BASE,
        F.GET_QUEUE_NUM,
        F.GET_CONFIG,
        F.GET_INFLIGHT_FD,
        F.GET_MAX_MEM_SLOTS,
        F.GET_STATUS,
    }
)
WANTED_PROTOCOL = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.MTU
    | ProtocolFeature.RARP
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)
"""What QEMU asks for, minus migration/postcopy/inflight which the simulator does not do."""
DEFAULT_NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.NET_MRG_RXBUF
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.NET_MAC
    | VirtioFeature.NET_MQ
)


class BackendNack(Exception):
    """The back-end answered a NEED_REPLY request with a non-zero ack."""


class UnexpectedReply(Exception):
    """A reply for another request (or a second reply) came on the main channel."""


def default_ram() -> GuestRam:
    """Two regions with a hole, RAM above 4 GiB as in a real guest."""
    return GuestRam([(0, 8 << 20), (0x1_0000_0000, 8 << 20)])


@dataclass(slots=True)
class Vring:
    """Per-queue front-end state: the ring in guest RAM and its eventfds."""

    ring: SplitRing | PackedRing
    kick: int
    call: int
    err: int
    pending: list[bytes] = field(default_factory=list)


class Frontend:
    """One vhost-user connection seen from the front-end.

    The Frontend owns its GuestRam (a given one too): leaving the context
    closes RAM, sockets and eventfds.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        nursery: trio.Nursery,
        *,
        ram: GuestRam | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.main = Channel(sock, FrontendRequest)
        self.backend: Channel | None = None
        self.nursery = nursery
        self.ram = ram if ram is not None else default_ram()
        self.viommu = VIommu(self.ram)
        self.dma: Dma = PhysicalDma(self.ram)
        self.timeout = timeout
        self.features = 0
        self.protocol_features = 0
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.vrings: dict[int, Vring] = {}
        self.strict_iommu = False
        """Invalidate each buffer's IOVA once the device returns it (Linux iommu.strict=1)."""
        self.log: list[tuple[str, Message]] = []
        """Every message in both directions on both channels, for sequence assertions."""
        self.backend_messages: list[Message] = []
        self.backend_closed = trio.Event()
        self._lock = trio.Lock()
        self._eventfds: list[int] = []
        self._logs: list[DirtyBitmap] = []

    # -- lifecycle ------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: str, *, ram: GuestRam | None = None, timeout: float = 5.0, wait: float = 10.0
    ) -> AsyncIterator[Frontend]:
        """Connect to a listening back-end, retrying until ``wait`` seconds pass."""
        with trio.fail_after(wait):
            while True:
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                    await trio.sleep(0.05)
        async with cls.attach(sock, ram, timeout) as fe:
            yield fe

    @classmethod
    @asynccontextmanager
    async def listen(
        cls, path: str, *, ram: GuestRam | None = None, timeout: float = 5.0, wait: float = 10.0
    ) -> AsyncIterator[Frontend]:
        """Listen on ``path`` (QEMU server=on) and accept the back-end's connection."""
        lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await lsock.bind(path)
        except OSError:
            lsock.close()
            raise
        try:
            lsock.listen(1)
            with trio.fail_after(wait):
                sock, _ = await lsock.accept()
        finally:
            lsock.close()
            os.unlink(path)
        async with cls.attach(sock, ram, timeout) as fe:
            yield fe

    @classmethod
    @asynccontextmanager
    async def attach(
        cls, sock: trio.socket.SocketType, ram: GuestRam | None = None, timeout: float = 5.0
    ) -> AsyncIterator[Frontend]:
        """Run over an already connected socket (e.g. one end of a socketpair)."""
        async with trio.open_nursery() as nursery:
            fe = cls(sock, nursery, ram=ram, timeout=timeout)
            try:
                yield fe
            finally:
                nursery.cancel_scope.cancel()
                fe._close()

    def _close(self) -> None:
        self.main.close()
        if self.backend is not None:
            self.backend.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        for bitmap in self._logs:
            bitmap.close()
        self._logs = []
        self.ram.close()

    # -- raw messaging --------------------------------------------------
    def _expects_reply(self, code: FrontendRequest, need_reply: bool) -> bool:
        if code in ALWAYS_REPLIED:
            return True
        return need_reply and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    async def send(
        self,
        code: FrontendRequest,
        payload: Payload = None,
        fds: Sequence[int] = (),
        need_reply: bool = False,
        *,
        expect_reply: bool | None = None,
    ) -> Message | None:
        """Send one request; return its reply when one is due (GET_*, or an ack)."""
        data = encode_request(code, payload, need_reply=need_reply)
        wants = self._expects_reply(code, need_reply) if expect_reply is None else expect_reply
        async with self._lock:
            with trio.fail_after(self.timeout):
                await self.main.send(data, fds)
                self.log.append(("fe->be", Message(code, _flags(need_reply), payload, [])))
                if not wants:
                    return None
                return await self._reply(code)

    async def _reply(self, code: FrontendRequest) -> Message:
        msg = await self.main.receive()
        self.log.append(("be->fe", msg))
        for fd in msg.fds:
            os.close(fd)
        if msg.code != code or not msg.is_reply:
            raise UnexpectedReply(f"sent {code.name}, got {msg}")
        return msg

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write arbitrary bytes (malformed framing tests)."""
        async with self._lock:
            with trio.fail_after(self.timeout):
                await self.main.send(data, fds)

    async def recv_reply(self, code: FrontendRequest) -> Message:
        """Read the reply of a request sent with send_raw."""
        async with self._lock:
            with trio.fail_after(self.timeout):
                return await self._reply(code)

    async def expect_closed(self, timeout: float | None = None) -> None:
        """Wait until the back-end closes the main channel (fatal input)."""
        with trio.fail_after(timeout or self.timeout):
            await self.main.wait_closed()

    async def _ack(
        self, code: FrontendRequest, payload: Payload = None, fds: Sequence[int] = ()
    ) -> int:
        """Send with NEED_REPLY (when REPLY_ACK is on); raise on a failure ack."""
        reply = await self.send(code, payload, fds, need_reply=True)
        if reply is None:
            return 0
        assert isinstance(reply.payload, int)
        if reply.payload != 0:
            raise BackendNack(f"{code.name} -> ack {reply.payload:#x}")
        return reply.payload

    async def _get_u64(self, code: FrontendRequest) -> int:
        reply = await self.send(code)
        assert reply is not None and isinstance(reply.payload, int)
        return reply.payload

    # -- control requests -----------------------------------------------
    async def set_owner(self) -> None:
        await self.send(F.SET_OWNER)

    async def get_features(self) -> int:
        self.backend_features = await self._get_u64(F.GET_FEATURES)
        return self.backend_features

    async def set_features(self, features: int) -> None:
        self.features = features
        await self._ack(F.SET_FEATURES, features)
        if features & VirtioFeature.ACCESS_PLATFORM:
            self.dma = IommuDma(self.viommu)

    async def get_protocol_features(self) -> int:
        self.backend_protocol_features = await self._get_u64(F.GET_PROTOCOL_FEATURES)
        return self.backend_protocol_features

    async def set_protocol_features(self, features: int) -> None:
        await self.send(F.SET_PROTOCOL_FEATURES, features)
        self.protocol_features = features

    async def get_queue_num(self) -> int:
        return await self._get_u64(F.GET_QUEUE_NUM)

    async def get_max_mem_slots(self) -> int:
        return await self._get_u64(F.GET_MAX_MEM_SLOTS)

    async def get_status(self) -> int:
        return await self._get_u64(F.GET_STATUS)

    async def set_status(self, status: int) -> None:
        await self._ack(F.SET_STATUS, status)

    async def net_set_mtu(self, mtu: int) -> None:
        await self._ack(F.NET_SET_MTU, mtu)

    async def send_rarp(self, mac: bytes) -> None:
        await self.send(F.SEND_RARP, int.from_bytes(mac.ljust(8, b"\0"), "little"))

    async def reset_device(self) -> None:
        await self.send(F.RESET_DEVICE)

    async def set_backend_req_fd(self) -> None:
        """Hand the back-end its channel and serve it in a task (like QEMU's main loop)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.send(F.SET_BACKEND_REQ_FD, None, [theirs.fileno()])
        finally:
            theirs.close()
        self.backend = Channel(trio.socket.from_stdlib_socket(ours), BackendRequest)
        self.nursery.start_soon(self._serve_backend, self.backend)

    def region_payload(self, region: RamRegion) -> MemoryRegion:
        return MemoryRegion(region.gpa, region.size, region.uaddr, region.mmap_offset)

    async def set_mem_table(self, regions: Sequence[RamRegion] | None = None) -> None:
        regions = self.ram.regions if regions is None else regions
        table = MemoryTable(tuple(self.region_payload(r) for r in regions))
        await self._ack(F.SET_MEM_TABLE, table, [r.fd for r in regions])

    async def add_mem_reg(self, region: RamRegion) -> None:
        await self._ack(F.ADD_MEM_REG, SingleMemoryRegion(self.region_payload(region)), [region.fd])

    async def rem_mem_reg(self, region: RamRegion) -> None:
        await self._ack(F.REM_MEM_REG, SingleMemoryRegion(self.region_payload(region)))

    async def set_vring_num(self, q: int, num: int) -> None:
        await self.send(F.SET_VRING_NUM, VringState(q, num))

    async def set_vring_base(self, q: int, base: int) -> None:
        await self.send(F.SET_VRING_BASE, VringState(q, base))

    async def set_vring_addr(
        self, q: int, ring: SplitRing | PackedRing | None = None, flags: int = 0, log: int = 0
    ) -> None:
        ring = ring or self.vrings[q].ring
        addr = VringAddr(q, flags, ring.desc_addr, ring.used_addr, ring.avail_addr, log)
        await self.send(F.SET_VRING_ADDR, addr)

    # -- live migration (QEMU's vhost_migration_log order) ---------------
    async def set_log_base(self, size: int | None = None, offset: int = 0) -> DirtyBitmap:
        """Share a dirty log covering guest RAM (``size`` bytes of bitmap at ``offset``).

        The memfd has a page of sentinel bytes before ``offset`` and after the
        bitmap: the back-end must never write there.
        """
        bitmap = DirtyBitmap.create(self.ram, size, offset)
        self._logs.append(bitmap)
        reply = await self.send(
            F.SET_LOG_BASE,
            LogInfo(bitmap.size, bitmap.offset),
            [bitmap.fd],
            expect_reply=bool(self.protocol_features & ProtocolFeature.LOG_SHMFD),
        )
        if reply is not None and reply.payload is not None:
            raise UnexpectedReply(f"SET_LOG_BASE reply with a payload: {reply}")
        return bitmap

    async def start_logging(self) -> None:
        """LOG_ALL on, then every ring's addresses again with VHOST_VRING_F_LOG."""
        await self.set_features(self.features | VirtioFeature.LOG_ALL)
        iova = bool(self.features & VirtioFeature.ACCESS_PLATFORM)
        for q, vring in sorted(self.vrings.items()):
            # QEMU's used_phys: guest-physical, or the IOVA behind a vIOMMU.
            ring = vring.ring
            await self.set_vring_addr(q, flags=1, log=ring.used_addr if iova else ring.used_gpa)
        await self.get_features()  # a round trip: everything above was handled

    async def stop_logging(self) -> None:
        await self.set_features(self.features & ~VirtioFeature.LOG_ALL)
        for q in sorted(self.vrings):
            await self.set_vring_addr(q)
        await self.get_features()

    async def get_vring_base(self, q: int) -> int:
        reply = await self.send(F.GET_VRING_BASE, VringState(q, 0))
        assert reply is not None and isinstance(reply.payload, VringState)
        return reply.payload.num

    async def set_vring_enable(self, q: int, on: bool = True) -> None:
        await self.send(F.SET_VRING_ENABLE, VringState(q, int(on)))

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    async def _set_vring_fd(self, code: FrontendRequest, q: int, fd: int | None) -> None:
        payload = VringFd(q, fd is None)
        await self.send(code, payload, [] if fd is None else [fd])

    async def set_vring_kick(self, q: int, fd: int | None) -> None:
        await self._set_vring_fd(F.SET_VRING_KICK, q, fd)

    async def set_vring_call(self, q: int, fd: int | None) -> None:
        await self._set_vring_fd(F.SET_VRING_CALL, q, fd)

    async def set_vring_err(self, q: int, fd: int | None) -> None:
        await self._set_vring_fd(F.SET_VRING_ERR, q, fd)

    # -- IOTLB ----------------------------------------------------------
    async def iotlb_msg(self, msg: IotlbMsg) -> int:
        """Send one IOTLB_MSG with NEED_REPLY like QEMU; return (and record) the ack."""
        reply = await self.send(F.IOTLB_MSG, msg, need_reply=True)
        ack = reply.payload if reply is not None and isinstance(reply.payload, int) else None
        self.viommu.record(Direction.TO_BACKEND, msg, ack)
        return ack or 0

    async def iotlb_update(self, iova: int, size: int) -> None:
        """Pre-load the back-end's IOTLB from the vIOMMU (QEMU never does; tests may)."""
        for msg in self.viommu.update_for(iova, size):
            await self.iotlb_msg(msg)

    async def iotlb_invalidate(self, iova: int, size: int) -> int:
        return await self.iotlb_msg(VIommu.invalidate_msg(iova, size))

    async def iotlb_lazy_flush(self) -> int:
        """Linux lazy-mode flush-all: INVALIDATE iova=0xfef00000 up to exactly 2**64."""
        return await self.iotlb_msg(VIommu.lazy_flush_msg())

    async def unmap_and_invalidate(self, iova: int, size: int) -> int:
        """The guest unmaps, then the vIOMMU tells the back-end (strict mode)."""
        self.viommu.unmap(iova, size)
        return await self.iotlb_invalidate(iova, size)

    async def _serve_backend(self, chan: Channel) -> None:
        try:
            while True:
                msg = await chan.receive()
                self.backend_messages.append(msg)
                self.log.append(("be->fe backend", msg))
                for fd in msg.fds:
                    os.close(fd)
                if msg.code == BackendRequest.IOTLB_MSG and isinstance(msg.payload, IotlbMsg):
                    self.viommu.record(Direction.FROM_BACKEND, msg.payload)
                    if msg.payload.type == IotlbType.MISS:
                        await self._on_miss(msg.payload)
                if msg.need_reply:
                    assert isinstance(msg.code, BackendRequest)
                    await chan.send(encode_reply(msg.code, 0))
        except (ChannelClosed, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.backend_closed.set()

    async def _on_miss(self, miss: IotlbMsg) -> None:
        policy = self.viommu.policy
        if policy.mode is MissMode.NEVER:
            return
        try:
            update = self.viommu.answer_miss(miss.iova, miss.perm)
        except ValueError:
            if self.ram.regions:
                raise
            return  # a MISS that raced the teardown: the guest RAM is already gone
        if update is None:
            return
        if policy.mode is MissMode.DELAY:
            self.nursery.start_soon(self._late_update, update, policy.delay)
        else:
            await self.iotlb_msg(update)

    async def _late_update(self, update: IotlbMsg, delay: float) -> None:
        await trio.sleep(delay)
        await self.iotlb_msg(update)

    # -- notifications --------------------------------------------------
    def kick(self, q: int) -> None:
        os.eventfd_write(self.vrings[q].kick, 1)

    async def wait_call(self, q: int, timeout: float = 1.0) -> bool:
        """True if the back-end signalled ``q`` within ``timeout`` (and consume it)."""
        fd = self.vrings[q].call
        with trio.move_on_after(timeout):
            while True:
                try:
                    os.eventfd_read(fd)
                    return True
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
        return False

    def call_pending(self, q: int) -> bool:
        try:
            os.eventfd_read(self.vrings[q].call)
            return True
        except BlockingIOError:
            return False

    def err_pending(self, q: int) -> bool:
        try:
            os.eventfd_read(self.vrings[q].err)
            return True
        except BlockingIOError:
            return False

    # -- the whole QEMU-like setup -----------------------------------------
    def add_ring(self, q: int, size: int = 256, *, start: int | None = None) -> Vring:
        """Lay out queue ``q`` in guest RAM (call after SET_FEATURES: IOVAs need the dma).

        A packed ring (RING_PACKED negotiated) may ``start`` at any position
        (index | wrap << 15), as a ring that already went round.
        """
        event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        ring: SplitRing | PackedRing
        if self.features & VirtioFeature.RING_PACKED:
            ring = PackedRing(
                self.ram,
                self.dma,
                size,
                event_idx=event_idx,
                start=0x8000 if start is None else start,
            )
        else:
            ring = SplitRing(self.ram, self.dma, size, event_idx=event_idx)
        vring = Vring(ring, self._eventfd(), self._eventfd(), self._eventfd())
        self.vrings[q] = vring
        return vring

    async def start_ring(self, q: int, base: int | None = None) -> None:
        """Size, base (default: where the ring stands), addresses and eventfds of ``q``."""
        vring = self.vrings[q]
        ring = vring.ring
        await self.set_vring_num(q, ring.size)
        if base is None:
            base = ring.base if isinstance(ring, PackedRing) else 0
        await self.set_vring_base(q, base)
        await self.set_vring_addr(q)
        await self.set_vring_kick(q, vring.kick)
        await self.set_vring_call(q, vring.call)
        await self.set_vring_err(q, vring.err)

    async def net_setup(
        self,
        queue_pairs: int = 1,
        *,
        iommu: bool = False,
        features: int | None = None,
        protocol_features: int | None = None,
        queue_size: int = 256,
        mtu: int | None = None,
    ) -> None:
        """Negotiate, share memory and start 2*queue_pairs rings, in QEMU's order."""
        await self.set_owner()
        offered = await self.get_features()
        wanted = DEFAULT_NET_FEATURES if features is None else features
        if iommu:
            wanted |= VirtioFeature.ACCESS_PLATFORM
            if not offered & VirtioFeature.ACCESS_PLATFORM:
                raise RuntimeError("back-end does not offer ACCESS_PLATFORM")
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            pf_offered = await self.get_protocol_features()
            pf = pf_offered & (WANTED_PROTOCOL if protocol_features is None else protocol_features)
            need = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
            if iommu and pf & need != need:
                raise RuntimeError("vIOMMU needs REPLY_ACK and BACKEND_REQ")
            await self.set_protocol_features(pf)
            if pf & ProtocolFeature.MQ and await self.get_queue_num() < queue_pairs:
                raise RuntimeError("back-end has fewer queues than asked")
            if pf & ProtocolFeature.BACKEND_REQ:
                await self.set_backend_req_fd()
            if pf & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                await self.get_max_mem_slots()
        await self.set_features(wanted & offered)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        if self.protocol_features & ProtocolFeature.STATUS:
            await self.set_status(status)
        await self.set_mem_table()
        if mtu is not None and self.protocol_features & ProtocolFeature.MTU:
            await self.net_set_mtu(mtu)
        for q in range(2 * queue_pairs):
            self.add_ring(q, queue_size)
            await self.start_ring(q)
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            for q in range(2 * queue_pairs):
                await self.set_vring_enable(q, True)
        if self.protocol_features & ProtocolFeature.STATUS:
            await self.set_status(status | DeviceStatus.DRIVER_OK)

    # -- net traffic (see net.py) ---------------------------------------
    async def send_frames(
        self, q: int, frames: Sequence[bytes], *, indirect: bool = False, timeout: float = 5.0
    ) -> list[Completion]:
        return await net.send_frames(self, q, frames, indirect=indirect, timeout=timeout)

    def post_rx(self, q: int, n: int, buf_size: int = 2048) -> None:
        net.post_rx(self, q, n, buf_size)

    async def recv_frames(
        self, q: int, timeout: float = 1.0, *, count: int | None = None
    ) -> list[bytes]:
        return await net.recv_frames(self, q, timeout, count=count)

    async def stop(self) -> dict[int, int]:
        """QEMU's stop: disable, then GET_VRING_BASE on every ring."""
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            for q in self.vrings:
                await self.set_vring_enable(q, False)
        return {q: await self.get_vring_base(q) for q in self.vrings}


def _flags(need_reply: bool) -> HeaderFlag:
    return HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else HeaderFlag(0))
