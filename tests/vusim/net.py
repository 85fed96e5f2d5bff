"""virtio-net traffic on top of the rings: TX frames out, RX frames in.

Kept out of frontend.py so the message layer does not know it is a net
device.  The header is 12 bytes (VERSION_1 or MRG_RXBUF) or 10 (legacy);
``num_buffers`` (bytes 10-11) says how many RX chains one frame spans.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from protocol import VirtioFeature

from .rings import Buffer, Completion

if TYPE_CHECKING:
    from .frontend import Frontend

_HDR = struct.Struct("<BBHHHHH")


@dataclass(slots=True, frozen=True)
class NetHeader:
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, size: int = 12) -> bytes:
        raw = _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )
        return raw[:size]

    @classmethod
    def unpack(cls, data: bytes) -> NetHeader:
        return cls(*_HDR.unpack(data[:12].ljust(12, b"\0")))


def header_len(features: int) -> int:
    if features & (VirtioFeature.VERSION_1 | VirtioFeature.NET_MRG_RXBUF):
        return 12
    return 10


async def wait_used(fe: Frontend, q: int, count: int, timeout: float) -> list[Completion]:
    """Collect ``count`` completions, waking on calls but also polling (no call needed)."""
    ring = fe.vrings[q].ring
    done: list[Completion] = []
    with trio.fail_after(timeout):
        while len(done) < count:
            got = ring.collect_used()
            done += got
            if len(done) >= count:
                break
            if not got:
                await fe.wait_call(q, 0.01)
    await _after_completion(fe, done)
    return done


async def _after_completion(fe: Frontend, done: Sequence[Completion]) -> None:
    if not fe.strict_iommu:
        return
    for c in done:
        if c.chain is not None:
            for addr, size in c.chain.dma:
                await fe.iotlb_invalidate(addr, size)


async def send_frames(
    fe: Frontend,
    q: int,
    frames: Sequence[bytes],
    *,
    header: NetHeader | None = None,
    indirect: bool = False,
    timeout: float = 5.0,
) -> list[Completion]:
    """Post frames on TX queue ``q``, kick, and wait until the device used them all."""
    ring = fe.vrings[q].ring
    hlen = header_len(fe.features)
    hdr = (header or NetHeader()).pack(hlen)
    done: list[Completion] = []
    pending = list(frames)
    while pending:
        batch, pending = pending[: ring.size // 2], pending[ring.size // 2 :]
        bufs = []
        old = ring.avail_idx
        for frame in batch:
            gpa = fe.ram.alloc(hlen + len(frame), 64)
            fe.ram.write(gpa, hdr + frame)
            bufs.append(gpa)
            ring.post([Buffer(gpa, hlen + len(frame))], indirect=indirect)
        if ring.needs_kick(old):
            fe.kick(q)
        try:
            done += await wait_used(fe, q, len(batch), timeout)
        finally:
            for gpa in bufs:
                fe.ram.free(gpa)
    return done


def post_rx(fe: Frontend, q: int, n: int, buf_size: int = 2048, *, kick: bool = True) -> None:
    """Offer ``n`` device-writable buffers on RX queue ``q``."""
    ring = fe.vrings[q].ring
    old = ring.avail_idx
    for _ in range(n):
        gpa = fe.ram.alloc(buf_size, 64)
        ring.post([Buffer(gpa, buf_size, writable=True)])
    if kick and ring.needs_kick(old):
        fe.kick(q)


async def recv_frames(
    fe: Frontend, q: int, timeout: float = 1.0, *, count: int | None = None, refill: bool = True
) -> list[bytes]:
    """Frames the device wrote on RX queue ``q``, merged over num_buffers chains.

    Waits for ``count`` frames (or for the first one when count is None) up to
    ``timeout`` and returns what arrived; the used buffers are freed and, with
    ``refill``, replaced.
    """
    vring = fe.vrings[q]
    ring = vring.ring
    hlen = header_len(fe.features)
    mrg = bool(fe.features & VirtioFeature.NET_MRG_RXBUF)
    frames: list[bytes] = []
    parts: list[bytes] = vring.pending
    want = 1 if count is None else count
    with trio.move_on_after(timeout):
        while len(frames) < want:
            got = ring.collect_used()
            if not got:
                await fe.wait_call(q, 0.01)
                continue
            sizes = []
            for c in got:
                if c.chain is None:
                    raise AssertionError(f"device returned unknown RX head {c.head}")
                parts.append(ring.read_buffers(c))
                sizes.append(c.chain.buffers[0].size)
                for b in c.chain.buffers:
                    fe.ram.free(b.gpa)
                while parts:
                    nbuf = NetHeader.unpack(parts[0]).num_buffers if mrg else 1
                    if len(parts) < max(nbuf, 1):
                        break
                    chunk = b"".join(parts[: max(nbuf, 1)])
                    del parts[: max(nbuf, 1)]
                    frames.append(chunk[hlen:])
            await _after_completion(fe, got)
            if refill:
                for size in sizes:
                    post_rx(fe, q, 1, size, kick=False)
                fe.kick(q)
    return frames
