"""The C burst path: TX bursts and RX delivery compiled through cffi.

:class:`FastTxQueue` and :class:`FastRxQueue` are drop-in subclasses of
``net.TxQueue``/``net.RxQueue``; the loops themselves live in
``vhostd/_native_build.py``. They keep every check of the Python reference
(same faults, same misses, same counters; ``tests/test_fastpath.py`` proves it
on random and malicious rings) and the single-door rule: C touches guest
memory only inside ranges that :meth:`GuestMemory.extent` returned, cached per
queue and dropped whenever the memory generation moves.

The ring indices stay in the queue (``vqueue.Virtqueue``, split or packed):
each C call gets a copy and
hands it back, so ``publish``/``needs_interrupt``/``want_kicks`` and the
Python reference (which takes over for the rare chain C declines) see one
state. ``VHOSTD_FASTPATH=0`` in the environment selects the pure-Python path.
"""

from __future__ import annotations

import os
from typing import Any

from protocol.enums import IotlbPerm

from . import net
from .guestmem import OutsideMemory
from .iotlb import IotlbError
from .memory import local_address
from .native import ffi, lib
from .net import BURST, Frame, QueueStats, Sink
from .offload import PLAIN, BadHeader, VnetHeader, check_tx
from .packed import PackedQueue
from .virtqueue import QueueError, QueueFault
from .vqueue import Virtqueue

__all__ = ["ENABLED", "FastRxQueue", "FastTxQueue", "FrameBurst", "RxQueue", "TxQueue"]

ENABLED = os.environ.get("VHOSTD_FASTPATH", "1") != "0"
TOO_BIG = BadHeader.TOO_BIG.value
"""Whether sessions use the C path (set VHOSTD_FASTPATH=0 for the reference)."""

MAX_PIECES = 1024
MAX_HEADS = 256
MAX_BURST = 256
SCRATCH = 1 << 18
"""Bytes for TX frames spread over several buffers (gathered); at least one max frame."""

DONE, NEED, FAULT, SLOW, FULL, NOBUF, DROPPED = (
    lib.VHOSTD_DONE,
    lib.VHOSTD_NEED,
    lib.VHOSTD_FAULT,
    lib.VHOSTD_SLOW,
    lib.VHOSTD_FULL,
    lib.VHOSTD_NOBUF,
    lib.VHOSTD_DROPPED,
)

_FAULTS = (
    None,
    QueueFault.HEAD_RANGE,
    QueueFault.NEXT_RANGE,
    QueueFault.LOOP,
    QueueFault.AVAIL_JUMP,
    QueueFault.INDIRECT_LEN,
    QueueFault.INDIRECT_NESTED,
    QueueFault.INDIRECT_NEXT,
    QueueFault.INDIRECT_OFF,
    QueueFault.DIRECTION,
    QueueFault.TOO_LONG,
    QueueFault.RX_SMALL,
    QueueFault.WRAP,
    QueueFault.ID_RANGE,
)


class _Ring:
    """What C needs of one queue: ring pointers, translation cache, work areas."""

    __slots__ = ("_gen", "_keep", "_log", "cache", "heads", "pieces", "queue", "scratch", "vq")

    def __init__(self, queue: Virtqueue, scratch: int = 0, heads: int = MAX_HEADS) -> None:
        self.queue = queue
        vq = self.vq = ffi.new("struct vhostd_vq *")
        self.cache = ffi.new("struct vhostd_tcache *")
        self.pieces = ffi.new("struct vhostd_piece[]", MAX_PIECES)
        self.heads = ffi.new("struct vhostd_head[]", heads)
        self.scratch = ffi.new("uint8_t[]", max(scratch, 1))
        vq.size = queue.size
        vq.indirect = queue.indirect
        vq.max_chain_bytes = queue.max_chain_bytes
        vq.pieces, vq.max_pieces = self.pieces, MAX_PIECES
        vq.heads, vq.max_heads = self.heads, heads
        vq.scratch, vq.scratch_len = self.scratch, scratch
        if isinstance(queue, PackedQueue):
            # The walk records ids and counts where packed.py's reference reads them.
            vq.packed = 1
            vq.p_ids, vq.p_counts = queue.ids, queue.counts
        self._gen: object = None
        self._log: object = None
        self._keep: tuple[Any, ...] = ()

    def sync(self) -> None:
        """Follow ``queue.refresh()``: new ring views and an empty cache if memory moved.

        Also follows ``queue.set_log`` (the views stay, the log changes).
        """
        q = self.queue
        gen = q._gen
        if q.log is not self._log and gen is not None:
            self._log = q.log
            self.vq.log = q.log.c if q.log is not None else ffi.NULL
            self.vq.log_used = q.log_used
        if gen != self._gen:
            lib.vhostd_tc_clear(self.cache)
            vq = self.vq
            vq.desc = vq.avail = vq.used = ffi.NULL
            self._keep = ()
            if gen is not None:
                keep = (q._desc, q._avail, q._used)  # the region lives as long as its views
                vq.desc, vq.avail, vq.used = (ffi.cast("uint8_t *", local_address(v)) for v in keep)
                self._keep = keep
            vq.log_used = q.log_used
            self._gen = gen

    def fill(self, addr: int, perm: int) -> bool:
        """Cache the door's extent around ``addr``; False if the reference must decide.

        IotlbMiss and IotlbDenied propagate: they are exactly what the
        reference raises for the chain C stopped at (C walks it in the same
        order and every earlier byte was translated and allowed).
        OutsideMemory is not: the reference checks the IOTLB over the whole
        descriptor before the memory table, so it gets the chain.
        """
        try:
            start, end, host, gpa = self.queue.mem.extent(addr, IotlbPerm(perm))
        except OutsideMemory:
            return False
        lib.vhostd_tc_insert(self.cache, addr, start, end - 1, host, perm, gpa)
        return True

    def error(self) -> QueueError:
        vq = self.vq
        fault = _FAULTS[vq.fault]
        assert fault is not None
        head, value, limit = int(vq.f_head), int(vq.f_value), int(vq.f_limit)
        detail = {
            QueueFault.HEAD_RANGE: f"head {head} >= queue size {limit}",
            QueueFault.NEXT_RANGE: f"next {value} >= {limit}",
            QueueFault.LOOP: f"chain at head {head} exceeds {limit}",
            QueueFault.AVAIL_JUMP: (f"avail index moved {value} past {head} on a ring of {limit}"),
            QueueFault.INDIRECT_LEN: f"indirect table of {value} bytes",
            QueueFault.INDIRECT_NESTED: "indirect table inside another",
            QueueFault.INDIRECT_NEXT: "indirect descriptor with NEXT",
            QueueFault.INDIRECT_OFF: "indirect descriptor not negotiated",
            QueueFault.DIRECTION: (
                f"head {head}: {'read-only' if value else 'writable'} descriptor"
            ),
            QueueFault.TOO_LONG: f"head {head}: over {value} bytes",
            QueueFault.RX_SMALL: (
                f"head {head}: buffer of {value} bytes cannot hold the {limit}-byte header"
            ),
            QueueFault.WRAP: (
                f"chain at {head}: descriptor {value & 0x7FFF} not available "
                f"in wrap {value >> 15} (flags {limit:#x})"
            ),
            QueueFault.ID_RANGE: f"buffer id {value} >= queue size {limit}",
        }[fault]
        return QueueError(fault, detail)


def _discards(sink: Sink | None) -> bool:
    """True when frames only need counting: no sink, or a sink-mode port's session."""
    if sink is None:
        return True
    if getattr(getattr(sink, "__func__", None), "__name__", None) != "_sink":
        return False
    port = getattr(getattr(sink, "__self__", None), "port", None)
    forward = getattr(port, "_forward", None)
    return getattr(forward, "__name__", None) == "_drop"


def _burst_sink(sink: Sink | None) -> tuple[Any, bool]:
    """The port's whole-burst entry when ``sink`` is a session whose port has one,
    and whether it takes bursts whose frames carry offload headers (``FrameBurst.hdrs``)."""
    if getattr(getattr(sink, "__func__", None), "__name__", None) != "_sink":
        return None, False
    session = getattr(sink, "__self__", None)
    port = getattr(session, "port", None)
    forward_burst = getattr(port, "forward_burst", None)
    if forward_burst is None:
        return None, False
    return lambda burst: forward_burst(session, burst), bool(getattr(port, "burst_headers", False))


class FrameBurst:
    """The frames one C TX call collected, valid until the next call on that queue.

    Handed whole to a port that can take a burst (reflect and switch modes),
    so that delivery is one C call per burst (per destination for the
    switch); ``view(i)`` gives one frame to the per-frame path. ``hdrs``,
    when set, is each frame's accepted offload header (``PLAIN`` for most);
    a refused frame then has length 0 and goes nowhere.
    """

    __slots__ = ("frames", "hdrs", "n")

    def __init__(self, frames: Any, n: int, hdrs: list[VnetHeader] | None = None) -> None:
        self.frames = frames
        self.n = n
        self.hdrs = hdrs

    def __len__(self) -> int:
        return self.n

    def view(self, i: int) -> memoryview:
        f = self.frames[i]
        return memoryview(ffi.buffer(f.ptr, f.len))

    def mac_run(self, i: int) -> int:
        """The end of the run of frames from ``i`` with frame ``i``'s 12 MAC bytes (> ``i``)."""
        return int(lib.vhostd_mac_run(self.frames, i, self.n))

    def macs(self, i: int) -> bytes:
        """Destination and source MAC of frame ``i`` (fewer bytes if it is that short)."""
        f = self.frames[i]
        macs: bytes = ffi.buffer(f.ptr, min(f.len, 12))[:]
        return macs

    def select(self, i: int, nsel: int) -> int:
        """Which of ``nsel`` RX queues ``Session.send`` picks for frame ``i`` (-1: too short)."""
        f = self.frames[i]
        if f.len < 12:
            return -1
        p = f.ptr
        return int((p[5] ^ p[11]) % nsel)

    @classmethod
    def of(cls, buffers: list[bytes]) -> tuple[FrameBurst, Any]:
        """A burst over Python buffers (tests); keep the second item alive with it."""
        keep = [ffi.from_buffer("uint8_t[]", b) for b in buffers]
        frames = ffi.new("struct vhostd_frame[]", max(len(buffers), 1))
        for i, data in enumerate(keep):
            frames[i].ptr = data
            frames[i].len = len(data)
        return cls(frames, len(buffers)), keep


class FastTxQueue(net.TxQueue):
    """``TxQueue`` with the burst loop in C."""

    __slots__ = ("_done", "_frames", "_nframes", "_ring")

    def __init__(
        self, queue: Virtqueue, features: int, max_frame: int, stats: QueueStats | None = None
    ) -> None:
        super().__init__(queue, features, max_frame, stats)
        # Heads for a whole burst: none goes back before the burst ends, so at most the ring.
        self._ring = _Ring(queue, max(SCRATCH, max_frame), heads=queue.size)
        self._frames = ffi.new("struct vhostd_frame[]", MAX_BURST)
        self._nframes = ffi.new("uint32_t *")
        self._done = ffi.new("uint32_t *")

    def burst(self, sink: Sink | None, limit: int = BURST) -> int:
        q = self.queue
        q.refresh()
        ring = self._ring
        ring.sync()
        vq, cache = ring.vq, ring.cache
        frames, nframes, done_p = self._frames, self._nframes, self._done
        collect = 0 if _discards(sink) else 1
        batch, batch_hdrs = _burst_sink(sink) if collect else (None, False)
        stats = self.stats
        hdr_len, max_frame = self.hdr_len, self.max_frame
        done = 0
        stalls = 0
        vq.last_avail, vq.last_used = q.last_avail, q.last_used
        try:
            while done < limit:
                chunk = min(limit - done, MAX_BURST)
                rc = lib.vhostd_tx_burst(
                    vq, cache, done, chunk, hdr_len, max_frame, collect, frames, nframes, done_p
                )
                took = done_p[0]
                done += took
                if vq.packets or vq.dropped:
                    stats.packets += vq.packets
                    stats.bytes += vq.bytes
                    stats.dropped += vq.dropped
                    if vq.bad_header:  # frames over max_frame: C counts only those
                        stats.bad_header += vq.bad_header
                        stats.bad_headers[TOO_BIG] += vq.bad_header
                    vq.packets = vq.bytes = vq.dropped = vq.bad_header = 0
                n = nframes[0]
                if vq.vnet_frames:
                    vq.vnet_frames = 0
                    assert sink is not None
                    self._offloaded(frames, n, sink, batch, batch_hdrs)
                elif n and batch is not None:
                    batch(FrameBurst(frames, n))
                elif n:
                    assert sink is not None
                    buffer = ffi.buffer
                    for i in range(n):
                        f = frames[i]
                        sink(memoryview(buffer(f.ptr, f.len)), PLAIN)
                if rc == DONE:
                    if took < chunk:
                        break  # the ring is empty
                    continue
                if took:
                    stalls = 0
                if rc == FULL:
                    continue
                if rc == NEED:
                    stalls += 1
                    if stalls <= lib.VHOSTD_TC_SLOTS and ring.fill(vq.need_addr, vq.need_perm):
                        continue
                    rc = SLOW
                if rc == SLOW:
                    stalls = 0
                    # The reference judges this chain; it is returned with the rest.
                    head, frame, hdr = self.take(done, sink is not None)
                    ring.heads[done].id = head
                    done += 1
                    if frame is not None:
                        sink(frame, hdr)  # type: ignore[misc]
                    continue
                raise ring.error()
        finally:
            if done:
                lib.vhostd_tx_complete(vq, done)
                q.last_avail, q.last_used = vq.last_avail, vq.last_used
                q.publish()
                stats.bursts += 1
        return done

    def _offloaded(
        self, frames: Any, n: int, sink: Sink, batch: Any, batch_hdrs: bool = False
    ) -> None:
        """Pass on frames of which some carry an offload header, as the reference would.

        Every header is judged first (``offload.check_tx``; a refused frame is
        uncounted as sent and counted as dropped, as ``take`` counts it), then
        the frames go in order: to a port that takes headers with its burst
        (the switch) all at once, refused ones with length 0; otherwise runs
        without offloads as bursts, the others one by one with their header.
        """
        stats = self.stats
        buffer = ffi.buffer
        hdrs: list[VnetHeader | None] = []
        for i in range(n):
            f = frames[i]
            if f.vnet == ffi.NULL:
                hdrs.append(PLAIN)
                continue
            frame = memoryview(buffer(f.ptr, f.len))
            got = check_tx(buffer(f.vnet, 10)[:], frame, self.features)
            if isinstance(got, BadHeader):
                stats.packets -= 1
                stats.bytes -= f.len
                stats.dropped += 1
                stats.bad_header += 1
                stats.bad_headers[got.value] += 1
                hdrs.append(None)
                continue
            if got.gso_type:
                stats.gso_packets += 1
            else:
                stats.csum_partial += 1
            hdrs.append(got)
        if batch_hdrs:
            for i in range(n):
                if hdrs[i] is None:
                    frames[i].len = 0
            batch(FrameBurst(frames, n, [PLAIN if h is None else h for h in hdrs]))
            return
        start = 0
        for i in range(n + 1):
            hdr = hdrs[i] if i < n else None
            if hdr is PLAIN:
                continue
            if i > start:  # the run of plain frames before this one
                if batch is not None:
                    batch(FrameBurst(frames + start, i - start))
                else:
                    for k in range(start, i):
                        sink(memoryview(buffer(frames[k].ptr, frames[k].len)), PLAIN)
            if hdr is not None:
                sink(memoryview(buffer(frames[i].ptr, frames[i].len)), hdr)
            start = i + 1


class FastRxQueue(net.RxQueue):
    """``RxQueue`` with delivery in C (``flush_backlog`` comes with it)."""

    __slots__ = ("_done", "_features", "_hdr_c", "_ring")

    def __init__(
        self,
        queue: Virtqueue,
        features: int,
        stats: QueueStats | None = None,
        backlog_limit: int = 512,
    ) -> None:
        super().__init__(queue, features, stats, backlog_limit)
        self._ring = _Ring(queue, SCRATCH)  # scratch: one frame at a time in deliver_batch
        self._hdr_c = ffi.new("uint8_t[]", bytes(self.hdr))
        self._done = ffi.new("uint32_t *")
        self._features = features

    def switch_ready(self, crx: Any) -> bool:
        """Fill ``crx`` (a ``struct vhostd_sw_rx``) for one C switch burst; False: not now.

        Not now means a backlog waits (later frames queue behind it) or the
        ring has no views; an IOTLB miss or fault on the ring itself
        propagates, and the caller leaves the frames to ``deliver``, which
        meets it again and handles it as for a lone frame.
        """
        if self.backlog:
            return False
        q = self.queue
        q.refresh()
        ring = self._ring
        if q._gen != ring._gen or q.log is not ring._log:
            ring.sync()
        if ring._gen is None:
            return False
        vq = ring.vq
        vq.last_avail, vq.last_used = q.last_avail, q.last_used
        crx.vq, crx.tc, crx.hdr = vq, ring.cache, self._hdr_c
        crx.hdr_len, crx.mergeable, crx.features = self.hdr_len, self.mergeable, self._features
        return True

    def switch_fill(self) -> bool:
        """Cache the translation the C switch stopped at; False when the door says no
        now (a miss, a denial, outside memory): ``deliver`` meets it and decides."""
        vq = self._ring.vq
        try:
            return self._ring.fill(vq.need_addr, vq.need_perm)
        except IotlbError:
            return False

    def switch_done(self, crx: Any) -> bool:
        """Take back what a C switch burst did to the ring; True if it took frames
        (delivered or dropped: ``deliver`` returned True, the session publishes)."""
        vq, q = self._ring.vq, self.queue
        q.last_avail, q.last_used = vq.last_avail, vq.last_used
        took = bool(vq.packets or vq.dropped)
        if took:
            stats = self.stats
            stats.packets += vq.packets
            stats.bytes += vq.bytes
            stats.dropped += vq.dropped
            vq.packets = vq.bytes = vq.dropped = 0
            if crx.gso_packets or crx.csum_partial:
                stats.gso_packets += crx.gso_packets
                stats.csum_partial += crx.csum_partial
                crx.gso_packets = crx.csum_partial = 0
        return took

    def deliver(self, frame: Frame, hdr: VnetHeader = PLAIN) -> bool:
        q = self.queue
        ring = self._ring
        if q._gen != ring._gen or q.log is not ring._log:
            ring.sync()
        if ring._gen is None:
            # no views: fail exactly like the reference
            return net.RxQueue.deliver(self, frame, hdr)
        with ffi.from_buffer("uint8_t[]", frame) as data:
            return self._deliver(ring, frame, data, hdr)

    def _deliver(self, ring: _Ring, frame: Frame, data: Any, hdr: VnetHeader) -> bool:
        q = self.queue
        vq = ring.vq
        stalls = 0
        hdr_c = self._hdr_c if hdr is PLAIN else ffi.new("uint8_t[]", bytes(self.header_for(hdr)))
        while True:
            vq.last_avail, vq.last_used = q.last_avail, q.last_used
            rc = lib.vhostd_rx_deliver(
                vq, ring.cache, data, len(data), self.mergeable, self.hdr_len, hdr_c
            )
            q.last_avail, q.last_used = vq.last_avail, vq.last_used
            if rc == DONE:
                stats = self.stats
                stats.packets += 1
                stats.bytes += len(data)
                if hdr is not PLAIN:
                    self.count_offload(hdr)
                return True
            if rc == NOBUF:
                return False
            if rc == DROPPED:
                self.stats.dropped += 1
                return True
            if rc == NEED:
                stalls += 1
                if stalls <= lib.VHOSTD_TC_SLOTS and ring.fill(vq.need_addr, vq.need_perm):
                    continue
                rc = SLOW
            if rc == SLOW:
                return net.RxQueue.deliver(self, frame, hdr)  # the reference takes this frame
            raise ring.error()

    def deliver_batch(
        self,
        burst: FrameBurst,
        swap: bool = False,
        start: int = 0,
        nsel: int = 1,
        want: int = 0,
        end: int | None = None,
        stop_on_drop: bool = False,
    ) -> int:
        """``deliver`` frames of ``burst`` from ``start`` on, in order (MACs swapped if ``swap``).

        Only frames before ``end`` (all when None): the switch ends a batch
        where the destination changes. ``stop_on_drop`` ends it after the
        first frame dropped for want of room (a source port's template).

        Stops before the first frame that is neither delivered nor dropped
        (no buffer, a translation the door must be asked for and refuses,
        a fault, or a chain the reference must take) and returns how many
        were handled; nothing of that frame is taken, and the caller hands it
        and the rest to ``deliver`` one by one, which decides exactly as the
        reference. Never raises for the ring or the IOTLB. The caller
        refreshed the queue and publishes. With ``nsel`` > 1 it also stops
        before a frame ``Session.send`` hashes to another queue than ``want``.
        """
        q = self.queue
        ring = self._ring
        if q._gen != ring._gen or q.log is not ring._log:
            ring.sync()
        if ring._gen is None:
            return 0
        vq, cache, done_p = ring.vq, ring.cache, self._done
        frames, n = burst.frames, burst.n if end is None else end
        stats = self.stats
        done = stalls = 0
        n -= start
        frames = frames + start
        while done < n:
            vq.last_avail, vq.last_used = q.last_avail, q.last_used
            rc = lib.vhostd_rx_deliver_batch(
                vq,
                cache,
                frames + done,
                n - done,
                self.mergeable,
                self.hdr_len,
                self._hdr_c,
                swap,
                nsel,
                want,
                stop_on_drop,
                done_p,
            )
            q.last_avail, q.last_used = vq.last_avail, vq.last_used
            took = done_p[0]
            if took:
                done += took
                stalls = 0
                stats.packets += vq.packets
                stats.bytes += vq.bytes
                stats.dropped += vq.dropped
                vq.packets = vq.bytes = vq.dropped = 0
            if rc != NEED:
                break
            stalls += 1
            if stalls > lib.VHOSTD_TC_SLOTS:
                break
            try:
                if not ring.fill(vq.need_addr, vq.need_perm):
                    break
            except IotlbError:
                break
        return done


# What sessions construct: ``from .fastpath import RxQueue, TxQueue``.
TxQueue: type[net.TxQueue] = FastTxQueue if ENABLED else net.TxQueue
RxQueue: type[net.RxQueue] = FastRxQueue if ENABLED else net.RxQueue
