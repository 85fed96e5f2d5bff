"""virtio-net on top of virtqueues (split or packed): headers, TX bursts and RX delivery.

The ring walker knows nothing of packets; this module knows nothing of
sockets. A TX burst turns available chains into frames handed, while their
views are still valid, to a ``sink`` callable; RX delivery copies frames
into the chains the driver posted, merging buffers when MRG_RXBUF allows.
Counters are plain ints, published elsewhere once per burst.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.enums import VirtioFeature as VF

from .offload import MAX_OFFLOAD_FRAME, PLAIN, BadHeader, VnetHeader, check_tx
from .virtqueue import QueueError, QueueFault

if TYPE_CHECKING:
    from .vqueue import Virtqueue

ETH_HLEN = 14
MIN_FRAME = ETH_HLEN
HDR_V1 = 12
HDR_LEGACY = 10
HOST_TSO = VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6
NUM_BUFFERS = struct.Struct("<H")
BURST = 256
"""Chains a TX queue takes per wake-up; each burst pays the task switch, the
switch flush and the interrupt decision once, so bigger is cheaper per packet
until one ring would starve the others (every burst ends with a checkpoint)."""

Frame = bytes | bytearray | memoryview
Sink = Callable[[memoryview, VnetHeader], None]
"""Takes a transmitted frame and its accepted offload header (``offload.PLAIN`` for none)."""

# What a net back-end without offloads can honour. QEMU handles the control
# queue, MAC and STATUS itself; DPDK's virtio-user wants CTRL_VQ for MQ.
BASE_FEATURES = (
    VF.VERSION_1
    | VF.ANY_LAYOUT
    | VF.RING_INDIRECT_DESC
    | VF.RING_EVENT_IDX
    | VF.NET_MRG_RXBUF
    | VF.NET_MTU
    | VF.NET_STATUS
    | VF.NET_MQ
    | VF.NET_CTRL_VQ
    | VF.IN_ORDER
    | VF.RING_PACKED
    | VF.PROTOCOL_FEATURES
    | VF.LOG_ALL
    | VF.NET_GUEST_ANNOUNCE
)


def header_size(features: int) -> int:
    """The virtio-net header length the driver and device agreed on."""
    return HDR_V1 if features & (VF.VERSION_1 | VF.NET_MRG_RXBUF) else HDR_LEGACY


def max_tx_frame(features: int, mtu: int) -> int:
    """The longest frame a driver may transmit: 64 KiB GSO frames once HOST_TSO is agreed."""
    return MAX_OFFLOAD_FRAME if features & HOST_TSO else mtu + 18


@dataclass(slots=True)
class QueueStats:
    """Per-queue counters: plain ints, read by the metrics publisher."""

    packets: int = 0
    bytes: int = 0
    dropped: int = 0
    bad_header: int = 0
    kicks: int = 0
    interrupts: int = 0
    suppressed: int = 0
    bursts: int = 0
    gso_packets: int = 0
    """TX: GSO super-frames taken; RX: GSO super-frames delivered whole."""
    csum_partial: int = 0
    """TX: frames taken with NEEDS_CSUM; RX: delivered with NEEDS_CSUM (checksum left open)."""
    backlogged: int = 0
    """RX: frames that waited in the backlog (no buffer, a miss, frames already waiting)."""
    bad_headers: Counter[str] = field(default_factory=Counter)
    """TX: ``bad_header`` drops by reason (``offload.BadHeader``)."""


def _gather(views: list[memoryview], skip: int) -> memoryview:
    """The chain's bytes after ``skip`` header bytes, without a copy when possible."""
    if len(views) == 1:
        return views[0][skip:]
    first = views[0]
    if len(first) == skip and len(views) == 2:
        return views[1]
    data = b"".join(views)
    return memoryview(data)[skip:]


def _scatter(views: list[memoryview], offset: int, data: Frame) -> None:
    """Copy ``data`` into ``views`` starting ``offset`` bytes into the first."""
    pos = 0
    end = len(data)
    for view in views:
        room = len(view) - offset
        if room <= 0:
            offset -= len(view)
            continue
        n = min(room, end - pos)
        view[offset : offset + n] = data[pos : pos + n]
        pos += n
        offset = 0
        if pos == end:
            return


class TxQueue:
    """A transmit queue (odd index): the driver's frames leave through ``sink``."""

    __slots__ = ("features", "hdr_len", "max_frame", "queue", "stats")

    def __init__(
        self, queue: Virtqueue, features: int, max_frame: int, stats: QueueStats | None = None
    ) -> None:
        self.queue = queue
        self.features = features
        self.hdr_len = header_size(features)
        self.max_frame = max_frame
        self.stats = stats if stats is not None else QueueStats()

    def burst(self, sink: Sink | None, limit: int = BURST) -> int:
        """Move up to ``limit`` frames; returns how many chains were taken.

        Every chain of the burst is walked and checked first, then the frames
        go to ``sink``, then the chains are returned as used: a frame is read
        before its chain is handed back, and what the sink writes to guest
        memory (a reflect port delivers into the same guest) cannot change
        how a later chain of the burst is judged. ``sink`` None discards (a
        started but disabled ring). An IotlbMiss or QueueError propagates
        after the chains walked so far went through those steps, so the burst
        resumes exactly where it stopped.
        """
        q = self.queue
        q.refresh()
        n = min(q.available(), limit)
        stats = self.stats
        frames: list[tuple[memoryview, VnetHeader]] = []
        heads: list[int] = []
        try:
            while len(heads) < n:
                head, frame, hdr = self.take(len(heads), sink is not None)
                if frame is not None:
                    frames.append((frame, hdr))
                heads.append(head)
        finally:
            if heads:
                try:
                    for frame, hdr in frames:
                        sink(frame, hdr)  # type: ignore[misc]
                finally:
                    for head in heads:
                        q.put(head, 0)
                    q.publish()
                    stats.bursts += 1
        return len(heads)

    def take(self, nth: int, gather: bool) -> tuple[int, memoryview | None, VnetHeader]:
        """Walk and judge the ``nth`` chain not yet taken, counting it; nothing is put.

        Returns its head and, if ``gather`` and the frame is to be sent, the
        frame's bytes (valid until the next await) with its accepted offload
        header. Raises what the walk raises.
        """
        q = self.queue
        stats = self.stats
        head = q.head(nth)
        views: list[memoryview] = []
        size = q.walk(head, False, views) - self.hdr_len
        if size < MIN_FRAME or size > self.max_frame:
            stats.dropped += 1
            if size > self.max_frame:  # a lie about the length as much as any header's
                stats.bad_header += 1
                stats.bad_headers[BadHeader.TOO_BIG.value] += 1
            return head, None, PLAIN
        raw = _header_bytes(views)
        hdr = PLAIN
        frame = None
        if raw[0] & 1 or raw[1]:  # NEEDS_CSUM or a GSO type: judged against the frame
            frame = _gather(views, self.hdr_len)
            got = check_tx(raw, frame, self.features)
            if isinstance(got, BadHeader):
                stats.bad_header += 1
                stats.bad_headers[got.value] += 1
                stats.dropped += 1
                return head, None, PLAIN
            hdr = got
            if hdr.gso_type:
                stats.gso_packets += 1
            else:
                stats.csum_partial += 1
        stats.packets += 1
        stats.bytes += size
        if gather and frame is None:
            frame = _gather(views, self.hdr_len)
        return head, frame if gather else None, hdr


def _header_bytes(views: list[memoryview]) -> bytes:
    """The first ten bytes of the chain (the offload part of the header), however split."""
    first = views[0]
    if len(first) >= 10:
        return bytes(first[:10])
    out = b""
    for view in views:
        out += bytes(view[: 10 - len(out)])
        if len(out) == 10:
            break
    return out


class RxQueue:
    """A receive queue (even index): frames enter the driver's posted buffers.

    Frames that find no buffer wait in a bounded backlog (copied, so they
    outlive the sender's views) until the driver posts more or the IOTLB
    answers; past the bound they are dropped and counted.
    """

    __slots__ = (
        "backlog",
        "backlog_limit",
        "hdr",
        "hdr_len",
        "mergeable",
        "queue",
        "stalled_at",
        "stats",
    )

    def __init__(
        self,
        queue: Virtqueue,
        features: int,
        stats: QueueStats | None = None,
        backlog_limit: int = 512,
    ) -> None:
        self.queue = queue
        self.hdr_len = header_size(features)
        self.mergeable = bool(features & VF.NET_MRG_RXBUF)
        self.hdr = bytearray(self.hdr_len)
        if self.hdr_len == HDR_V1:
            NUM_BUFFERS.pack_into(self.hdr, 10, 1)
        self.stats = stats if stats is not None else QueueStats()
        self.backlog: deque[tuple[bytes, VnetHeader]] = deque()
        self.backlog_limit = backlog_limit
        self.stalled_at = 0

    def enqueue(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        """Keep a copy of ``frame`` for later delivery, or drop it if full."""
        if len(self.backlog) >= self.backlog_limit:
            self.stats.dropped += 1
        else:
            self.backlog.append((bytes(frame), hdr))
            self.stats.backlogged += 1

    def header_for(self, hdr: VnetHeader) -> bytearray:
        """The header bytes to write before a frame with offload ``hdr`` (num_buffers 1).

        The caller made sure this receiver negotiated what ``hdr`` asks of it.
        """
        out = bytearray(hdr.pack().ljust(self.hdr_len, b"\0"))
        if self.hdr_len == HDR_V1:
            NUM_BUFFERS.pack_into(out, 10, 1)
        return out

    def count_offload(self, hdr: VnetHeader) -> None:
        if hdr.gso_type:
            self.stats.gso_packets += 1
        elif hdr.flags & 1:
            self.stats.csum_partial += 1

    def deliver(self, frame: Frame, hdr: VnetHeader = PLAIN) -> bool:
        """Copy one frame into the ring now; False if no buffer (nothing taken).

        ``hdr`` is the offload header written before it (one this receiver
        can take). Raises IotlbMiss or QueueError like the ring walker; the
        caller publishes and interrupts once per burst.
        """
        q = self.queue
        header = self.hdr if hdr is PLAIN else self.header_for(hdr)
        need = self.hdr_len + len(frame)
        views: list[memoryview] = []
        if not self.mergeable:
            if q.available() == 0:
                return False
            head = q.head()
            room = q.walk(head, True, views)
            self._check_room(head, room)
            if room < need:
                self.stats.dropped += 1
                return True
            _scatter(views, 0, header)
            _scatter(views, self.hdr_len, frame)
            if q.log is not None:
                self._log(views, need)
            q.put(head, need)
        else:
            avail = q.available()
            heads: list[tuple[int, int, int]] = []
            room = 0
            while room < need:
                if len(heads) == avail:
                    return False
                head = q.head(len(heads))
                start = len(views)
                got = q.walk(head, True, views)
                self._check_room(head, got)
                heads.append((head, got, start))
                room += got
            NUM_BUFFERS.pack_into(header, 10, len(heads))
            _scatter(views, 0, header)
            _scatter(views, self.hdr_len, frame)
            if q.log is not None:
                self._log(views, need)
            left = need
            for head, got, _ in heads:
                used = min(got, left)
                q.put(head, used)
                left -= used
        self.stats.packets += 1
        self.stats.bytes += len(frame)
        if hdr is not PLAIN:
            self.count_offload(hdr)
        return True

    def _log(self, views: list[memoryview], written: int) -> None:
        """Log the first ``written`` bytes of ``views`` (what was just scattered)."""
        q = self.queue
        log = q.log
        assert log is not None
        for view in views:
            if not written:
                return
            n = min(len(view), written)
            log.mark(q.mem.gpa_of(view), n)
            written -= n

    def _check_room(self, head: int, room: int) -> None:
        # A buffer that cannot take the header can never take a frame: a
        # driver posting those would have the device retry it forever.
        if room < self.hdr_len:
            raise QueueError(
                QueueFault.RX_SMALL,
                f"head {head}: buffer of {room} bytes cannot hold the {self.hdr_len}-byte header",
            )

    def flush_backlog(self) -> int:
        """Deliver waiting frames in order until the ring is full; returns count.

        When the ring has too few buffers for the next frame, ``stalled_at``
        keeps the avail index those buffers were counted at: the ring task
        then sleeps until the driver posts past it, instead of retrying what
        it already saw.
        """
        backlog = self.backlog
        if not backlog:
            return 0
        q = self.queue
        q.refresh()
        done = 0
        while backlog:
            seen = q.avail_idx()
            if not self.deliver(*backlog[0]):
                self.stalled_at = seen
                break
            backlog.popleft()
            done += 1
        return done
