"""One front-end connection: vhost-user requests in, a running net device out.

A :class:`Session` lives exactly as long as its connection. It owns a trio
nursery holding the main-channel reader, the back-end channel reader and one
task per started ring; leaving the nursery (peer gone, fatal error, daemon
stopping) runs one ``finally`` that stops every ring, closes every fd and
unmaps every region, whatever the path out.

Request handlers are synchronous. That is what makes IOTLB invalidation
safe: a ring task touches guest memory only between two awaits and keeps no
translated view across one, so by the time a handler runs, no access is in
flight, and the INVALIDATE ack it sends is true.

The ring tasks' loop is :mod:`vhostd.rings`; the IOTLB misses they stop at are
:mod:`vhostd.misses`. This module keeps the requests, the rings' start and
stop, what a broken ring means for the device, and the switch-facing side.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from protocol import (
    DeviceStatus,
    FrontendRequest,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LogInfo,
    MemoryTable,
    Message,
    Payload,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringFd,
    VringState,
    encode_ack,
    encode_reply,
)

from . import packed
from .channel import BackendChannel, Channel, close_fds
from .diagnosis import Diagnosis
from .dirtylog import DirtyLog
from .fastpath import RxQueue, TxQueue
from .guestmem import AccessError, GuestMemory
from .iotlb import ADDRESS_LIMIT, IoTlb, IotlbDenied, IotlbError, IotlbMiss
from .memory import MemoryError_
from .memory import MemoryTable as RegionTable
from .misses import MISS_LOOKAHEAD as MISS_LOOKAHEAD  # re-exported for importers of vhostd.session
from .misses import MISS_OUTSTANDING as MISS_OUTSTANDING
from .misses import MISS_TIMEOUT as MISS_TIMEOUT
from .misses import Misses
from .native import lib
from .net import max_tx_frame
from .offload import PLAIN, Action, VnetHeader, for_receiver
from .rings import RingLoop, interrupt
from .virtqueue import MAX_QUEUE_SIZE, QueueError, ring_sizes
from .vqueue import make_queue
from .vring import Vring, close_fd, signal

if TYPE_CHECKING:
    from .fastpath import FrameBurst
    from .port import Port

log = logging.getLogger(__name__)

R = FrontendRequest
VF = VirtioFeature
PF = ProtocolFeature

MAX_MEM_SLOTS = 64

OFFERED_PROTOCOL = (
    PF.MQ
    | PF.LOG_SHMFD
    | PF.REPLY_ACK
    | PF.RARP
    | PF.MTU
    | PF.BACKEND_REQ
    | PF.CONFIGURE_MEM_SLOTS
    | PF.STATUS
    | PF.RESET_DEVICE
)

# Requests whose reply carries data: answered even without NEED_REPLY.
WITH_BODY = frozenset(
    {
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.GET_VRING_BASE,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.GET_STATUS,
    }
)

_ACK = struct.Struct("<IIIQ")  # header (code, flags REPLY|VERSION, size 8) + u64
_RARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")


class RequestFailed(Exception):
    """A request that could not be honoured; ``kind`` is the metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Session:
    """The back-end side of one vhost-user connection."""

    def __init__(self, port: Port, channel: Channel) -> None:
        self.port = port
        self.stats = port.stats
        self.channel = channel
        cfg = port.config
        self.queue_pairs = cfg.queue_pairs
        self.offered_features = port.offered_features()
        self.offered_protocol = (
            OFFERED_PROTOCOL if cfg.iommu else OFFERED_PROTOCOL & ~PF.BACKEND_REQ
        )
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.mtu = cfg.mtu
        self.table = RegionTable(MAX_MEM_SLOTS)
        self.iotlb: IoTlb | None = None
        self.dirty_log: DirtyLog | None = None
        self.mem = GuestMemory(self.table)
        self.backend: BackendChannel | None = None
        self.misses = Misses(self.stats, self.mem, lambda: self.backend, port.miss_timeout)
        self.ring_loop = RingLoop(port, self._sink, self.misses)
        self.vrings = [Vring(i) for i in range(2 * self.queue_pairs)]
        self._rx_ready: list[Vring] = []
        self._dirty: dict[Vring, None] = {}
        self._nursery: trio.Nursery | None = None
        self.name = port.name
        self.closing = False
        self.diagnosis = Diagnosis(port.name)
        """What looks wrong with this connection (warnings in the log and in status)."""
        self.rarp_mac: bytes | None = None
        """The guest's MAC as SEND_RARP announced it (after a migration)."""

    # -- lifetime ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends; always cleans up."""
        self.stats.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_memory)
                nursery.start_soon(self.diagnosis.watch, self)
                await self._read_main()
                nursery.cancel_scope.cancel()
        finally:
            self._teardown()
            self.stats.disconnects += 1

    async def _watch_memory(self) -> None:
        """End the connection if guest memory vanishes under its mapping (SIGBUS guard).

        Until the teardown unmaps them, the lost regions hold zeros: stray
        reads see zeros, writes reach nothing, the rest of the daemon runs on.
        """
        lost = await self.table.wait_lost()
        self.stats.memory_faults += 1
        self.stats.note_error("memory_fault", f"guest memory region {', '.join(lost)} vanished")
        log.error(
            "%s: guest memory region %s vanished under the back-end (its memfd shrank; "
            "front-end is not sealing its memory): closing the connection",
            self.name,
            ", ".join(lost),
        )
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _read_main(self) -> None:
        handlers = self._handlers()
        while True:
            try:
                async for msg in self.channel.messages():
                    self.stats.requests += 1
                    await self._dispatch(handlers, msg)
                log.info("%s: front-end closed the connection", self.name)
                return
            except ProtocolError as exc:
                close_fds(exc.fds)
                self.stats.protocol_errors[exc.kind.value] += 1
                self.stats.note_error(exc.kind.value, str(exc))
                if exc.fatal:
                    log.error("%s: %s; closing the connection", self.name, exc)
                    return
                log.warning("%s: %s", self.name, exc)
                if exc.need_reply and exc.code is not None and self._acks:
                    await self.channel.send(_failure_ack(exc.code))
            except RequestFailed as exc:
                log.error("%s: %s; closing the connection", self.name, exc)
                return
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: front-end gone while answering: %s", self.name, exc)
                return

    async def _dispatch(
        self, handlers: dict[FrontendRequest, Callable[[Message], Payload]], msg: Message
    ) -> None:
        code = msg.code
        assert isinstance(code, FrontendRequest)
        handler = handlers.get(code)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: <- %s %s fds=%d", self.name, code.name, msg.payload, len(msg.fds))
        try:
            if handler is None:
                raise RequestFailed("unsupported_request", f"{code.name} is not supported")
            reply = handler(msg)
            ok = True
        except RequestFailed as exc:
            self.stats.protocol_errors[exc.kind] += 1
            self.stats.note_error(exc.kind, f"{code.name} refused: {exc}")
            log.warning("%s: %s refused: %s", self.name, code.name, exc)
            if code in WITH_BODY or self._log_reply(code):
                raise  # no reply could say it failed: the connection ends
            reply, ok = None, False
        finally:
            close_fds(msg.fds)
        if code in WITH_BODY or self._log_reply(code):
            await self.channel.send(encode_reply(code, reply))
        elif msg.need_reply and self._acks:
            await self.channel.send(encode_ack(code, ok))

    def _log_reply(self, code: FrontendRequest) -> bool:
        """With LOG_SHMFD the front-end waits for an (empty) reply to SET_LOG_BASE."""
        return code is R.SET_LOG_BASE and bool(self.protocol_features & PF.LOG_SHMFD)

    @property
    def _acks(self) -> bool:
        return bool(self.protocol_features & PF.REPLY_ACK)

    def _teardown(self) -> None:
        self.port.detach(self)
        for vring in self.vrings:
            vring.stop()
            vring.close_fds()
        self._rx_ready.clear()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.iotlb is not None:
            self.iotlb.flush()
        self._close_log()
        self.table.clear()
        self.channel.close()

    # -- request handlers --------------------------------------------------

    def _handlers(self) -> dict[FrontendRequest, Callable[[Message], Payload]]:
        return {
            R.GET_FEATURES: lambda m: self.offered_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: lambda m: None,
            R.RESET_OWNER: self._reset_device,
            R.GET_PROTOCOL_FEATURES: lambda m: self.offered_protocol,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: lambda m: None,  # the fd is closed with the message
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.GET_MAX_MEM_SLOTS: lambda m: MAX_MEM_SLOTS,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.GET_QUEUE_NUM: lambda m: self.queue_pairs,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SEND_RARP: self._send_rarp,
            R.NET_SET_MTU: self._net_set_mtu,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.IOTLB_MSG: self._iotlb_msg,
            R.RESET_DEVICE: self._reset_device,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: lambda m: self.status,
        }

    def _set_features(self, msg: Message) -> None:
        value = _u64(msg)
        extra = value & ~self.offered_features
        if extra:
            raise RequestFailed("bad_features", f"features {extra:#x} were not offered")
        if value & VF.LOG_ALL and self.dirty_log is None:
            raise RequestFailed(
                "log_all_without_log", "LOG_ALL without a dirty log (SET_LOG_BASE first)"
            )
        running = [v for v in self.vrings if v.started]
        if running and self.features & ~value & VF.ACCESS_PLATFORM:
            # The guest asked for its vIOMMU to check every access; a front-end
            # may not take that away under running rings.
            raise RequestFailed(
                "features_changed_while_running",
                "ACCESS_PLATFORM dropped while rings run; reset the device first",
            )
        # LOG_ALL alone is migration starting or ending: the queues stay as they are.
        changed = (value ^ self.features) & ~VF.LOG_ALL
        self.features = value
        if value & VF.ACCESS_PLATFORM:
            if self.iotlb is None:
                self.iotlb = IoTlb(capacity=self.port.config.iotlb_entries, stats=self.stats.iotlb)
            self.mem.iotlb = self.iotlb
        else:
            self.mem.iotlb = None
        log.info(
            "%s: features %#x%s", self.name, value, " (device IOTLB on)" if self.mem.iotlb else ""
        )
        if changed:
            # The queues were built for the old features (header size, merging,
            # address space): rebuild them where they stand.
            for vring in running:
                self._restart_vring(vring)
        self._apply_log()

    def _set_protocol_features(self, msg: Message) -> None:
        value = _u64(msg)
        extra = value & ~self.offered_protocol
        if extra:
            raise RequestFailed("bad_features", f"protocol features {extra:#x} were not offered")
        self.protocol_features = value

    def _memory_changing(self) -> None:
        """Drop every view into guest memory before a region goes away."""
        for vring in self.vrings:
            q = vring.tx or vring.rx
            if q is not None:
                q.queue.drop_views()
        if self.iotlb is not None:
            self.iotlb.flush()
            self.stats.iotlb_entries = 0

    def _set_mem_table(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, MemoryTable)
        self._memory_changing()
        try:
            self.table.replace(payload.regions, msg.fds)
        except MemoryError_ as exc:
            raise RequestFailed("bad_memory_table", str(exc)) from None
        log.info(
            "%s: memory table of %d region(s), %d MiB, %d not sealed against shrinking",
            self.name,
            len(self.table),
            self.table.mapped_bytes >> 20,
            self.table.unsealed,
        )
        self._kick_all()

    def _add_mem_reg(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, SingleMemoryRegion)
        try:
            self.table.add(payload.region, msg.fds[0])
        except MemoryError_ as exc:
            raise RequestFailed("bad_memory_region", str(exc)) from None
        log.info(
            "%s: memory region added: gpa %#x, %d MiB (%d region(s), %d not sealed)",
            self.name,
            payload.region.guest_phys_addr,
            payload.region.memory_size >> 20,
            len(self.table),
            self.table.unsealed,
        )
        self._kick_all()

    def _rem_mem_reg(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, SingleMemoryRegion)
        self._memory_changing()
        try:
            self.table.remove(payload.region)
        except MemoryError_ as exc:
            raise RequestFailed("bad_memory_region", str(exc)) from None

    def _set_log_base(self, msg: Message) -> None:
        """Map the front-end's dirty log (migration is starting, or memory grew)."""
        payload = msg.payload
        assert isinstance(payload, LogInfo)
        if not self.protocol_features & PF.LOG_SHMFD:
            raise RequestFailed("log_shmfd_not_negotiated", "SET_LOG_BASE without LOG_SHMFD")
        try:
            new = DirtyLog(msg.fds[0], payload.mmap_size, payload.mmap_offset, self.table)
        except MemoryError_ as exc:
            raise RequestFailed("bad_log", str(exc)) from None
        old, self.dirty_log = self.dirty_log, new
        self._apply_log()  # the queues switch over before the old log goes
        if old is not None:
            self.stats.log_resizes += 1
            self._retire_log(old)
        log.info("%s: dirty log of %d KiB", self.name, new.size >> 10)

    @property
    def logging(self) -> bool:
        """Every write to guest memory is being logged (live migration)."""
        return self.dirty_log is not None and bool(self.features & VF.LOG_ALL)

    def _apply_log(self) -> None:
        target = self.dirty_log if self.logging else None
        for vring in self.vrings:
            q = vring.tx or vring.rx
            if q is not None:
                q.queue.set_log(target)

    def _retire_log(self, dirty: DirtyLog) -> None:
        self.stats.log_pages += dirty.logged
        self.stats.log_overflow += dirty.overflow
        dirty.close()

    def _close_log(self) -> None:
        dirty, self.dirty_log = self.dirty_log, None
        if dirty is not None:
            self._apply_log()
            self._retire_log(dirty)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestFailed(
                "bad_vring_index", f"vring {index} out of range (0..{len(self.vrings) - 1})"
            )
        return self.vrings[index]

    def _stopped_vring(self, msg: Message) -> tuple[Vring, int]:
        """The vring a NUM/ADDR/BASE request names, stopped first if running.

        DPDK's virtio-user repeats the whole ring setup on a live connection
        (after DRIVER_OK, when the application enables offloads), so a ring
        being reconfigured is stopped here and restarts on the next kick.
        """
        payload = msg.payload
        assert isinstance(payload, VringState | VringAddr)
        vring = self._vring(payload.index)
        if vring.started:
            vring.base = vring.next_avail
            self._stop_vring(vring)
        return vring, payload.num if isinstance(payload, VringState) else 0

    def _set_vring_num(self, msg: Message) -> None:
        vring, num = self._stopped_vring(msg)
        if self.features & VF.RING_PACKED:
            if not packed.valid_size(num):
                raise RequestFailed("bad_vring_num", f"packed vring size {num} is not 1..32768")
        elif not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RequestFailed("bad_vring_num", f"vring size {num} is not a power of 2 <= 32768")
        vring.size = num

    def _set_vring_addr(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, VringAddr)
        vring = self._vring(payload.index)
        old = vring.addr
        if not (vring.started and old is not None and _same_rings(old, payload)):
            # Only the log flag or address changed (migration starting): keep running.
            vring, _ = self._stopped_vring(msg)
        if self.mem.iotlb is None and vring.size:
            # Front-end addresses can be checked now (IOVAs only when used):
            # each ring must lie whole inside one region of the table.
            if not len(self.table):
                raise RequestFailed(
                    "bad_vring_addr", f"vring {vring.index} addresses before the memory table"
                )
            sizes = (
                packed.ring_sizes(vring.size)
                if self.features & VF.RING_PACKED
                else ring_sizes(vring.size, bool(self.features & VF.RING_EVENT_IDX))
            )
            for name, addr, size in zip(
                ("desc", "avail", "used"),
                (payload.desc, payload.avail, payload.used),
                sizes,
                strict=True,
            ):
                if self.table.uaddr_span(addr) < size:
                    raise RequestFailed(
                        "bad_vring_addr",
                        f"vring {vring.index} {name} {addr:#x}+{size:#x} is not inside one region",
                    )
            if payload.log_enabled and self.table.gpa_span(payload.log) < sizes[2]:
                raise RequestFailed(
                    "bad_vring_addr",
                    f"vring {vring.index} log_guest_addr {payload.log:#x}+{sizes[2]:#x} "
                    "is not inside one region",
                )
        # Packed rings: avail/used are the driver/device event areas (4 bytes each).
        event_align = 4 if self.features & VF.RING_PACKED else 2
        for name, addr, align in (
            ("desc", payload.desc, 16),
            ("avail", payload.avail, event_align),
            ("used", payload.used, 4),
        ):
            if addr % align:
                raise RequestFailed(
                    "bad_vring_addr",
                    f"vring {vring.index} {name} {addr:#x} is not {align}-byte aligned",
                )
        vring.addr = payload

    def _set_vring_base(self, msg: Message) -> None:
        vring, num = self._stopped_vring(msg)
        # Packed rings: avail index and wrap in bits 0-15, used index and wrap in 16-31.
        vring.base = num & (0xFFFFFFFF if self.features & VF.RING_PACKED else 0xFFFF)

    def _get_vring_base(self, msg: Message) -> VringState:
        payload = msg.payload
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        base = vring.next_avail
        self._stop_vring(vring)
        vring.base = base
        close_fd(vring.kick)
        vring.kick = None
        if self.iotlb is not None:
            self.iotlb.flush()
            self.stats.iotlb_entries = 0
        return VringState(vring.index, base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        payload = msg.payload
        assert isinstance(payload, VringFd)
        vring = self._vring(payload.index)
        fd = None if payload.no_fd else msg.fds.pop()
        return vring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if fd is None:
            raise RequestFailed("polling_unsupported", f"vring {vring.index}: no kick fd")
        self._stop_vring(vring)
        close_fd(vring.kick)
        vring.kick = fd
        vring.kick_reads = vring.kick_writes = 0
        self._start_vring(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fd(vring.call)
        vring.call = fd

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fd(vring.err)
        vring.err = fd

    def _set_vring_enable(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        vring.enabled = bool(payload.num)
        self._update_rx_ready()
        self._self_kick(vring)

    def _send_rarp(self, msg: Message) -> None:
        mac = _u64(msg).to_bytes(8, "little")[:6]
        self.rarp_mac = mac
        frame = _RARP.pack(
            b"\xff" * 6, mac, 0x8035, 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4)
        )
        self.port.forward(self, memoryview(frame))
        self.port.flush()

    def _net_set_mtu(self, msg: Message) -> None:
        mtu = _u64(msg)
        if not 68 <= mtu <= 65535:
            raise RequestFailed("bad_mtu", f"MTU {mtu} outside 68..65535")
        self.mtu = mtu

    def _set_backend_req_fd(self, msg: Message) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = BackendChannel(msg.fds.pop())
        assert self._nursery is not None
        self._nursery.start_soon(self.backend.drain)

    def _iotlb_msg(self, msg: Message) -> None:
        m = msg.payload
        assert isinstance(m, IotlbMsg)
        iotlb = self.iotlb
        if iotlb is None or self.mem.iotlb is None:
            raise RequestFailed("iotlb_not_negotiated", "IOTLB message without ACCESS_PLATFORM")
        if m.size == 0 or m.iova + m.size > ADDRESS_LIMIT:
            raise RequestFailed("bad_iotlb_range", f"IOTLB range {m.iova:#x}+{m.size:#x}")
        if m.type == IotlbType.UPDATE:
            if not IotlbPerm.NONE < m.perm <= IotlbPerm.RW:
                raise RequestFailed("bad_iotlb_perm", f"IOTLB update with perm {int(m.perm)}")
            if self.table.uaddr_span(m.uaddr) == 0:
                raise RequestFailed(
                    "bad_iotlb_uaddr", f"IOTLB update to {m.uaddr:#x}, outside the memory table"
                )
            iotlb.update(m.iova, m.size, m.uaddr, m.perm)
            self.misses.updated(m.iova, m.size)
        elif m.type == IotlbType.INVALIDATE:
            iotlb.invalidate(m.iova, m.size)
        else:
            raise RequestFailed("bad_iotlb_type", f"IOTLB message of type {m.type.name}")
        self.stats.iotlb_entries = len(iotlb)

    def _set_status(self, msg: Message) -> None:
        status = _u64(msg)
        if status == 0:
            # QEMU before 8.1 (commit 6f8be29ec1) sends SET_STATUS 0 BEFORE
            # GET_VRING_BASE when it stops the device (vm stop, migration): the rings
            # stop here, but GET_VRING_BASE must still report where they stood. Every
            # restart sends SET_VRING_BASE, so nothing relies on the base being zeroed.
            self._reset_rings(keep_base=True)
        self.status = status

    def _reset_device(self, msg: Message) -> None:
        self._reset_rings()
        self.status = 0
        self.features = 0
        self.mem.iotlb = None

    def _reset_rings(self, *, keep_base: bool = False) -> None:
        for vring in self.vrings:
            base = vring.next_avail if keep_base else 0
            self._stop_vring(vring)
            vring.close_fds()
            vring.enabled = vring.started = False
            vring.failed = None
            vring.base = base
        if self.iotlb is not None:
            self.iotlb.flush()
        self.misses.clear()

    # -- rings -------------------------------------------------------------

    def _start_vring(self, vring: Vring) -> None:
        if vring.addr is None or not vring.size:
            log.warning("%s: vring %d kicked before its size and addresses", self.name, vring.index)
            return
        features = self.features
        queue = make_queue(
            bool(features & VF.RING_PACKED),
            vring.index,
            vring.size,
            self.mem,
            desc_addr=vring.addr.desc,
            avail_addr=vring.addr.avail,
            used_addr=vring.addr.used,
            base=vring.base,
            event_idx=bool(features & VF.RING_EVENT_IDX),
            indirect=bool(features & VF.RING_INDIRECT_DESC),
        )
        if self.logging:
            queue.set_log(self.dirty_log)
        stats = self.stats.queue(vring.index)
        if vring.is_rx:
            vring.rx = RxQueue(queue, features, stats)
        else:
            vring.tx = TxQueue(queue, features, max_tx_frame(features, self.mtu), stats)
        vring.started = True
        vring.failed = None
        if not features & VF.PROTOCOL_FEATURES:
            vring.enabled = True
        vring.scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._ring_task, vring, vring.scope)
        self._update_rx_ready()
        if vring.index == 0:
            self.port.attach(self)

    def _restart_vring(self, vring: Vring) -> None:
        base, old = vring.next_avail, vring.rx
        self._stop_vring(vring)
        vring.base = base
        self._start_vring(vring)
        if old is not None and vring.rx is not None:
            vring.rx.backlog = old.backlog  # accepted frames wait on, in order

    def _stop_vring(self, vring: Vring) -> None:
        vring.stop()
        self._dirty.pop(vring, None)
        self._update_rx_ready()

    def _update_rx_ready(self) -> None:
        self._rx_ready = [
            v for v in self.vrings if v.is_rx and v.rx is not None and v.enabled and v.running
        ]

    def _kick_all(self) -> None:
        for vring in self.vrings:
            if vring.started:
                self._self_kick(vring)

    @staticmethod
    def _self_kick(vring: Vring) -> None:
        """Wake the ring's task as a kick would, counted as ours (not the guest's)."""
        if signal(vring.kick):
            vring.kick_writes += 1

    def _fail(self, vring: Vring, kind: str, detail: str) -> None:
        """Stop one broken ring; the rest of the port and the daemon go on."""
        self.stats.queue_faults[kind] += 1
        self.stats.note_error(kind, f"vring {vring.index} stopped: {detail}")
        log.error("%s: vring %d stopped: %s", self.name, vring.index, detail)
        vring.failed = detail
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        signal(vring.err)
        self._update_rx_ready()
        q = vring.rx
        if q is not None:
            self.stats.queue(vring.index).dropped += len(q.backlog)
            q.backlog.clear()

    async def _ring_task(self, vring: Vring, scope: trio.CancelScope) -> None:
        """Run one ring until cancelled; a ring the loop finds broken is failed here."""
        with scope:
            try:
                await self.ring_loop.run(vring)
            except QueueError as exc:
                self._fail(vring, exc.fault.value, str(exc))
            except IotlbDenied as exc:
                self.stats.blocked_accesses += 1
                await self.misses.access_failed(exc.iova, exc.need)
                self._fail(vring, "iotlb_denied", str(exc))
            except AccessError as exc:
                self._fail(vring, "access_error", str(exc))

    # -- the switch side -----------------------------------------------------

    def _sink(self, frame: memoryview, hdr: VnetHeader) -> None:
        self.port.forward(self, frame, hdr)

    def send(self, frame: memoryview | bytes | bytearray, hdr: VnetHeader = PLAIN) -> None:
        """Deliver a frame to this guest (the switch's Endpoint interface).

        A frame with offloads this guest did not negotiate is first made
        into what it can take (segmented, checksummed; see ``offload``).
        """
        if hdr is not PLAIN:
            out = for_receiver(frame, hdr, self.features)
            if out.action is Action.SEGMENTED:
                self.stats.offload.segmented += 1
                self.stats.offload.segments += len(out.frames)
            elif out.action is Action.CSUM_COMPLETED:
                self.stats.offload.csum_completed += 1
            for f in out.frames:
                self._send(f, out.hdr)
        else:
            self._send(frame, PLAIN)

    def _send(self, frame: memoryview | bytes | bytearray, hdr: VnetHeader) -> None:
        ready = self._rx_ready
        if not ready:
            self.stats.rx_not_ready += 1
            return
        vring = ready[(frame[5] ^ frame[11]) % len(ready)] if len(ready) > 1 else ready[0]
        rx = vring.rx
        assert rx is not None
        if not rx.backlog:
            try:
                rx.queue.refresh()
                if rx.deliver(frame, hdr):
                    self._dirty[vring] = None
                    return
            except IotlbMiss:
                pass
            except IotlbDenied as exc:
                # Same outcome as on the ring task: ACCESS_FAIL to the front-end,
                # and the frame in hand counted as dropped like the backlog.
                self.stats.blocked_accesses += 1
                self.stats.queue(vring.index).dropped += 1
                self._fail(vring, "iotlb_denied", str(exc))
                assert self._nursery is not None
                self._nursery.start_soon(self.misses.access_failed, exc.iova, exc.need)
                return
            except (QueueError, AccessError) as exc:
                kind = exc.fault.value if isinstance(exc, QueueError) else "access_error"
                self._fail(vring, kind, str(exc))
                return
        waiting = bool(rx.backlog)
        rx.enqueue(frame, hdr)
        # Wake the RX ring's task for the first frame that waits only: with frames
        # already waiting it is awake or waits for buffers or a MISS answer, and a
        # write per frame (a syscall each) only woke it to find the same.
        if not waiting and signal(vring.kick):
            vring.kick_writes += 1  # ours, not the guest's (diagnosis)

    def send_burst(self, burst: FrameBurst, start: int, swap: bool, end: int | None = None) -> int:
        """Deliver frames of ``burst`` from ``start`` on (up to ``end``) in C; returns how many.

        Stops before the first frame that would not go straight into its RX
        ring (none ready, a backlog, no buffer, a miss, a fault): the caller
        hands that one to ``send``, which decides it exactly as alone, and
        calls again for the rest. Frames pick their ring as in ``send``.
        """
        n = len(burst) if end is None else end
        i = start
        while i < n:
            ready = self._rx_ready
            nsel = len(ready)
            if nsel == 0:
                break
            want = burst.select(i, nsel) if nsel > 1 else 0
            if want < 0:
                break
            vring = ready[want]
            rx = vring.rx
            deliver_batch = getattr(rx, "deliver_batch", None)
            if rx is None or rx.backlog or deliver_batch is None:
                break
            try:
                rx.queue.refresh()
            except (IotlbError, QueueError, AccessError):
                break
            done: int = deliver_batch(burst, swap, i, nsel, want, n)
            if not done:
                break
            self._dirty[vring] = None
            i += done
        return i - start

    c_kind: int = lib.VHOSTD_SW_VHOST
    """What this endpoint is to the C switch (``fastswitch.CPort``): RX rings."""

    def c_prepare(self, port: Any) -> bool:
        """Ready the RX rings ``send`` would pick from for one C switch burst.

        False (nothing for C this burst; ``send`` takes the frames) when no
        ring is ready, there are more than C picks from, one is not a C
        queue, has a backlog, or cannot be refreshed (a miss, a fault:
        ``send`` meets the same and handles it).
        """
        port.nrx = 0
        ready = self._rx_ready
        n = len(ready)
        if not n or n > lib.VHOSTD_SW_RXQ:
            return False
        rxs = port.rx
        for i in range(n):
            rx = ready[i].rx
            ready_c = getattr(rx, "switch_ready", None)
            if ready_c is None:
                return False
            try:
                if not ready_c(rxs[i]):
                    return False
            except (IotlbError, QueueError, AccessError):
                return False
            port.nrx = i + 1
        return True

    def c_fill(self, port: Any) -> bool:
        """Translate what the C switch stopped at for ring ``port.need_rx``; False if not now."""
        i = port.need_rx
        ready = self._rx_ready
        if i >= port.nrx or i >= len(ready):
            return False
        fill = getattr(ready[i].rx, "switch_fill", None)
        return fill is not None and bool(fill())

    def c_finish(self, port: Any) -> None:
        """Take back the rings' indices and counters after a C switch burst."""
        ready, rxs, dirty = self._rx_ready, port.rx, self._dirty
        for i in range(port.nrx):
            vring = ready[i]
            if vring.rx.switch_done(rxs[i]):  # type: ignore[union-attr]
                dirty[vring] = None
        port.nrx = 0

    def flush(self) -> None:
        """Publish what ``send`` delivered and interrupt the guest once per burst."""
        dirty = self._dirty
        if dirty:
            for vring in dirty:
                rx = vring.rx
                if rx is not None and vring.failed is None:
                    rx.queue.publish()
                    interrupt(vring, rx.queue)
            dirty.clear()


def _same_rings(a: VringAddr, b: VringAddr) -> bool:
    return (a.desc, a.avail, a.used) == (b.desc, b.avail, b.used)


def _failure_ack(code: int) -> bytes:
    """A failure ack for a skipped request, even one whose code no enum names."""
    try:
        return encode_ack(R(code), False)
    except ValueError:
        return _ACK.pack(code, 0x5, 8, 1)


def _u64(msg: Message) -> int:
    payload = msg.payload
    assert isinstance(payload, int)
    return payload
