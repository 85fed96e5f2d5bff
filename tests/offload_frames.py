"""Hand-built TCP frames for the offload tests, with a deliberately naive checksum.

Nothing here shares code with ``vhostd.offload``: the builders write every
field from its definition, so a segment ``vhostd`` cuts can be compared byte
for byte with one built here from scratch.
"""

from __future__ import annotations

import struct

from vhostd.offload import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VnetHeader

DST = bytes.fromhex("525400000002")
SRC = bytes.fromhex("525400000001")
IP4_SRC, IP4_DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
IP6_SRC = bytes.fromhex("fd000000000000000000000000000001")
IP6_DST = bytes.fromhex("fd000000000000000000000000000002")
ACK, PSH, FIN, CWR, ECE = 0x10, 0x08, 0x01, 0x80, 0x40


def naive_checksum(data: bytes) -> int:
    """RFC 1071, one word at a time."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        while s > 0xFFFF:
            s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_header(seq: int, flags: int, options: bytes = b"", csum: int = 0) -> bytes:
    doff = (20 + len(options)) // 4
    return (
        struct.pack("!HHIIBBHHH", 40000, 5001, seq & 0xFFFFFFFF, 7, doff << 4, flags, 512, csum, 0)
        + options
    )


def tcp4(
    payload: bytes,
    seq: int = 1000,
    flags: int = ACK | PSH,
    ip_id: int = 0x1234,
    options: bytes = b"",
    csum: str = "full",
    vlan: int | None = None,
) -> bytes:
    """An Ethernet/IPv4/TCP frame; ``csum`` "full", "partial" (pseudo-header seed) or "zero"."""
    tcp_len = 20 + len(options) + len(payload)
    pseudo = IP4_SRC + IP4_DST + struct.pack("!BBH", 0, 6, tcp_len)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0, IP4_SRC, IP4_DST
    )
    ip = ip[:10] + struct.pack("!H", naive_checksum(ip)) + ip[12:]
    seg = tcp_header(seq, flags, options) + payload
    value = {
        "full": naive_checksum(pseudo + seg),
        "partial": ~naive_checksum(pseudo) & 0xFFFF,
        "zero": 0,
    }[csum]
    seg = seg[:16] + struct.pack("!H", value) + seg[18:]
    eth = DST + SRC + (struct.pack("!HH", 0x8100, vlan) if vlan is not None else b"")
    return eth + b"\x08\x00" + ip + seg


def tcp6(payload: bytes, seq: int = 1000, flags: int = ACK | PSH, csum: str = "full") -> bytes:
    tcp_len = 20 + len(payload)
    pseudo = IP6_SRC + IP6_DST + struct.pack("!I3xB", tcp_len, 6)
    ip = struct.pack("!IHBB", 0x60000000, tcp_len, 6, 64) + IP6_SRC + IP6_DST
    seg = tcp_header(seq, flags) + payload
    value = {
        "full": naive_checksum(pseudo + seg),
        "partial": ~naive_checksum(pseudo) & 0xFFFF,
        "zero": 0,
    }[csum]
    seg = seg[:16] + struct.pack("!H", value) + seg[18:]
    return DST + SRC + b"\x86\xdd" + ip + seg


def gso_header(frame: bytes, mss: int, v6: bool = False, ecn: bool = False) -> bytes:
    """What a Linux guest writes for a TSO frame (hdr_len = the headers)."""
    l4 = 14 + (40 if v6 else 20)
    hdr_len = l4 + (frame[l4 + 12] >> 4) * 4
    gso = (GSO_TCPV6 if v6 else GSO_TCPV4) | (0x80 if ecn else 0)
    return VnetHeader(F_NEEDS_CSUM, gso, hdr_len, mss, l4, 16).pack()


def csum_header(frame: bytes, v6: bool = False) -> bytes:
    l4 = 14 + (40 if v6 else 20)
    return VnetHeader(F_NEEDS_CSUM, 0, 0, 0, l4, 16).pack()
