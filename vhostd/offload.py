"""The virtio-net header's offload metadata and the software fallbacks, without I/O.

A guest that negotiated CSUM or HOST_TSO4/6 hands the device frames whose
checksum is only seeded (``NEEDS_CSUM``) or TCP "super-frames" of up to
64 KiB that the device is to cut at ``gso_size`` (GSO). This module

- reads the header a driver wrote (:meth:`VnetHeader.unpack`) and judges it
  against the negotiated features and the frame it came with
  (:func:`check_tx`): what is accepted comes out normalised, with the real
  header lengths; what is refused comes out as a :class:`BadHeader` (a metric
  label), so nothing malformed reaches another guest or the host kernel;
- turns an accepted frame into what one receiver can take
  (:func:`for_receiver`): whole when it negotiated the matching GUEST_*
  feature, else checksummed (:func:`complete_checksum`) or segmented
  (:func:`segment`) in software, as Linux's ``skb_checksum_help`` and
  ``tcp_gso_segment`` would.

Frames are bytes-like in, ``bytes`` out; nothing here knows rings or sockets.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

from protocol.enums import VirtioFeature as VF

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPPROTO_TCP = 6
TCP_CSUM_OFFSET = 16
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80

MAX_OFFLOAD_FRAME = ETH_HLEN + VLAN_HLEN + 40 + 0xFFFF
"""The largest frame a header may describe: 64 KiB of IPv6 payload behind one VLAN tag
(an IPv4 packet's 16-bit total length bounds it lower)."""
MIN_GSO_SIZE = 88
"""Linux's TCP_MIN_MSS: a smaller MSS would make one frame into hundreds of segments."""

VNET = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (num_buffers follows)."""

OFFLOAD_FEATURES = (
    VF.NET_CSUM
    | VF.NET_GUEST_CSUM
    | VF.NET_HOST_TSO4
    | VF.NET_HOST_TSO6
    | VF.NET_HOST_ECN
    | VF.NET_GUEST_TSO4
    | VF.NET_GUEST_TSO6
    | VF.NET_GUEST_ECN
)
"""What the device may offer: checksum and TCP segmentation, both ways."""


class VnetHeader(NamedTuple):
    """The first ten bytes of a virtio-net header."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VnetHeader:
        return cls(*VNET.unpack_from(data))

    def pack(self) -> bytes:
        return VNET.pack(*self)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN


PLAIN = VnetHeader()
"""No offload: a complete frame, checksums already right."""


class BadHeader(enum.StrEnum):
    """Why a transmitted header was refused (the frame is dropped and counted)."""

    CSUM_NOT_NEGOTIATED = "csum_not_negotiated"
    GSO_NOT_NEGOTIATED = "gso_not_negotiated"
    ECN_NOT_NEGOTIATED = "ecn_not_negotiated"
    UNKNOWN_GSO_TYPE = "unknown_gso_type"
    GSO_WITHOUT_CSUM = "gso_without_csum"
    GSO_SIZE_ZERO = "gso_size_zero"
    GSO_SIZE_SMALL = "gso_size_too_small"
    GSO_NOT_LARGER = "gso_not_larger_than_gso_size"
    GSO_HEADERS = "gso_headers_mismatch"
    CSUM_OUTSIDE = "csum_outside_frame"
    HDR_LEN = "hdr_len_past_frame"
    TOO_BIG = "frame_too_big"


class TcpLayout(NamedTuple):
    """Where a TCP frame's headers are: IP header, TCP header, payload offsets."""

    l3: int
    l4: int
    payload: int
    ipv6: bool


def tcp_layout(frame: bytes | bytearray | memoryview) -> TcpLayout | None:
    """The offsets of an unfragmented TCP/IPv4 or TCP/IPv6 frame, or None.

    IPv4 options are allowed; IPv6 extension headers are not (TCP must be the
    next header). The IP length field must match the frame exactly.
    """
    n = len(frame)
    if n < ETH_HLEN:
        return None
    l3 = ETH_HLEN
    ethertype = frame[12] << 8 | frame[13]
    if ethertype in VLAN_TPIDS:
        if n < ETH_HLEN + VLAN_HLEN:
            return None
        l3 += VLAN_HLEN
        ethertype = frame[16] << 8 | frame[17]
    if ethertype == ETH_P_IP:
        if n < l3 + 20 or frame[l3] >> 4 != 4:
            return None
        ihl = (frame[l3] & 0xF) * 4
        total = frame[l3 + 2] << 8 | frame[l3 + 3]
        frag = (frame[l3 + 6] << 8 | frame[l3 + 7]) & 0x3FFF  # MF and the offset
        if ihl < 20 or frame[l3 + 9] != IPPROTO_TCP or frag or total != n - l3:
            return None
        l4, ipv6 = l3 + ihl, False
    elif ethertype == ETH_P_IPV6:
        if n < l3 + 40 or frame[l3] >> 4 != 6 or frame[l3 + 6] != IPPROTO_TCP:
            return None
        if (frame[l3 + 4] << 8 | frame[l3 + 5]) != n - l3 - 40:
            return None
        l4, ipv6 = l3 + 40, True
    else:
        return None
    if n < l4 + 20:
        return None
    doff = (frame[l4 + 12] >> 4) * 4
    if doff < 20 or n < l4 + doff:
        return None
    return TcpLayout(l3, l4, l4 + doff, ipv6)


def check_tx(
    data: bytes | bytearray | memoryview,
    frame: bytes | bytearray | memoryview,
    features: int,
) -> VnetHeader | BadHeader:
    """Judge the header ``data`` a driver sent with ``frame`` under ``features``.

    Returns the header to forward (flags reduced to NEEDS_CSUM, ``hdr_len``
    and ``csum_start`` recomputed for GSO frames) or why it is refused.
    Flags other than NEEDS_CSUM mean nothing on transmit and are ignored.
    """
    hdr = VnetHeader.unpack(data)
    flags, gso_type = hdr.flags & F_NEEDS_CSUM, hdr.gso_type
    if not flags and gso_type == GSO_NONE:
        return PLAIN
    n = len(frame)
    if n > MAX_OFFLOAD_FRAME:
        return BadHeader.TOO_BIG
    if flags:
        if not features & VF.NET_CSUM:
            return BadHeader.CSUM_NOT_NEGOTIATED
        if hdr.csum_start >= n or hdr.csum_start + hdr.csum_offset + 2 > n:
            return BadHeader.CSUM_OUTSIDE
    if gso_type == GSO_NONE:
        return VnetHeader(flags, GSO_NONE, 0, 0, hdr.csum_start, hdr.csum_offset)
    gso = gso_type & ~GSO_ECN
    if gso not in (GSO_TCPV4, GSO_TCPV6):
        return BadHeader.UNKNOWN_GSO_TYPE
    if not features & (VF.NET_HOST_TSO4 if gso == GSO_TCPV4 else VF.NET_HOST_TSO6):
        return BadHeader.GSO_NOT_NEGOTIATED
    if gso_type & GSO_ECN and not features & VF.NET_HOST_ECN:
        return BadHeader.ECN_NOT_NEGOTIATED
    if not flags:
        return BadHeader.GSO_WITHOUT_CSUM
    if hdr.gso_size == 0:
        return BadHeader.GSO_SIZE_ZERO
    if hdr.gso_size < MIN_GSO_SIZE:
        return BadHeader.GSO_SIZE_SMALL
    if hdr.hdr_len > n:
        return BadHeader.HDR_LEN
    layout = tcp_layout(frame)
    if (
        layout is None
        or layout.ipv6 != (gso == GSO_TCPV6)
        or hdr.csum_start != layout.l4
        or hdr.csum_offset != TCP_CSUM_OFFSET
    ):
        return BadHeader.GSO_HEADERS
    if n - layout.payload <= hdr.gso_size:
        return BadHeader.GSO_NOT_LARGER
    return VnetHeader(F_NEEDS_CSUM, gso_type, layout.payload, hdr.gso_size, layout.l4, 16)


# -- checksums ----------------------------------------------------------------


def _sum(*parts: bytes | bytearray | memoryview) -> int:
    """The ones'-complement sum of the big-endian 16-bit words of ``parts`` joined.

    Every part but the last must have an even length. Computed as the value
    modulo 0xffff (2**16 is 1 modulo 0xffff), which differs from the folded
    sum only in writing 0xffff as 0: data that is not all zeros sums to 0xffff.
    """
    data = b"".join(parts)
    if len(data) & 1:
        data += b"\0"
    value = int.from_bytes(data, "big")
    s = value % 0xFFFF
    return 0xFFFF if s == 0 and value else s


def checksum(*parts: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of ``parts`` (RFC 1071), 0 written as 0xffff as Linux does."""
    return (~_sum(*parts) & 0xFFFF) or 0xFFFF


def complete_checksum(frame: bytes | bytearray | memoryview, hdr: VnetHeader) -> bytes:
    """``frame`` with the NEEDS_CSUM checksum finished (Linux ``skb_checksum_help``).

    The driver seeded the field with the pseudo-header sum; the checksum is
    over everything from ``csum_start`` to the end, that seed included.
    """
    out = bytearray(frame)
    at = hdr.csum_start + hdr.csum_offset
    struct.pack_into("!H", out, at, checksum(memoryview(out)[hdr.csum_start :]))
    return bytes(out)


def segment(frame: bytes | bytearray | memoryview, hdr: VnetHeader) -> list[bytes]:
    """Cut an accepted TCP GSO frame into ``gso_size`` segments, each complete.

    Every segment carries the frame's headers with its own IP length, IPv4
    ID (incremented per segment) and header checksum, TCP sequence number and
    a full TCP checksum; FIN and PSH stay on the last segment only and CWR on
    the first only, as Linux's ``tcp_gso_segment`` does.
    """
    layout = tcp_layout(frame)
    assert layout is not None, "segment() takes frames check_tx accepted"
    l3, l4, start, ipv6 = layout
    view = memoryview(bytes(frame))
    head = view[:start]
    payload = view[start:]
    mss = hdr.gso_size
    seq = int.from_bytes(head[l4 + 4 : l4 + 8], "big")
    tcp_flags = head[l4 + 13]
    ip_id = int.from_bytes(head[l3 + 4 : l3 + 6], "big")
    pseudo_addrs = bytes(head[l3 + 8 : l3 + 40] if ipv6 else head[l3 + 12 : l3 + 20])
    out = []
    total = len(payload)
    for i, off in enumerate(range(0, total, mss)):
        chunk = payload[off : off + mss]
        h = bytearray(head)
        f = tcp_flags
        if off + mss < total:
            f &= ~(TCP_FIN | TCP_PSH)
        if i:
            f &= ~TCP_CWR
        h[l4 + 13] = f
        struct.pack_into("!I", h, l4 + 4, (seq + off) & 0xFFFFFFFF)
        tcp_len = start - l4 + len(chunk)
        if ipv6:
            struct.pack_into("!H", h, l3 + 4, start - l3 - 40 + len(chunk))
            pseudo = pseudo_addrs + struct.pack("!IxxxB", tcp_len, IPPROTO_TCP)
        else:
            struct.pack_into("!HH", h, l3 + 2, start - l3 + len(chunk), (ip_id + i) & 0xFFFF)
            h[l3 + 10 : l3 + 12] = b"\0\0"
            struct.pack_into("!H", h, l3 + 10, ~_sum(h[l3:l4]) & 0xFFFF)
            pseudo = pseudo_addrs + struct.pack("!xBH", IPPROTO_TCP, tcp_len)
        h[l4 + 16 : l4 + 18] = b"\0\0"
        struct.pack_into("!H", h, l4 + 16, checksum(pseudo, h[l4:], chunk))
        out.append(bytes(h) + chunk)
    return out


# -- per receiver ---------------------------------------------------------------


class Action(enum.IntEnum):
    """What :func:`for_receiver` did to a frame (for the receiver's counters)."""

    AS_IS = 0
    GSO_WHOLE = 1
    """A GSO frame handed on whole: the receiver segments (or takes it whole)."""
    CSUM_COMPLETED = 2
    SEGMENTED = 3


class ForReceiver(NamedTuple):
    frames: Sequence[bytes | bytearray | memoryview]
    hdr: VnetHeader
    action: Action


def receiver_takes(features: int, hdr: VnetHeader) -> bool:
    """Whether a receiver that negotiated ``features`` may get ``hdr`` as it is."""
    if hdr.gso_type != GSO_NONE:
        need = VF.NET_GUEST_TSO4 if hdr.gso == GSO_TCPV4 else VF.NET_GUEST_TSO6
        if hdr.gso_type & GSO_ECN:
            need |= VF.NET_GUEST_ECN
        return features & need == need and bool(features & VF.NET_GUEST_CSUM)
    if hdr.flags:
        return bool(features & VF.NET_GUEST_CSUM)
    return True


def for_receiver(
    frame: bytes | bytearray | memoryview, hdr: VnetHeader, features: int
) -> ForReceiver:
    """What to hand a receiver with ``features``: frames and the header they all carry.

    ``hdr`` is one :func:`check_tx` accepted (or PLAIN). A receiver that
    can take it gets the frame unchanged; otherwise GSO frames are segmented
    and partial checksums completed, and the result carries no offload.
    """
    if hdr is PLAIN or hdr == PLAIN:
        return ForReceiver((frame,), PLAIN, Action.AS_IS)
    if receiver_takes(features, hdr):
        return ForReceiver(
            (frame,), hdr, Action.GSO_WHOLE if hdr.gso_type != GSO_NONE else Action.AS_IS
        )
    if hdr.gso_type != GSO_NONE:
        return ForReceiver(segment(frame, hdr), PLAIN, Action.SEGMENTED)
    if hdr.flags & F_NEEDS_CSUM:
        return ForReceiver((complete_checksum(frame, hdr),), PLAIN, Action.CSUM_COMPLETED)
    return ForReceiver((frame,), PLAIN, Action.AS_IS)  # DATA_VALID the receiver cannot take
