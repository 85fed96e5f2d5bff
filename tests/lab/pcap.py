"""Classic pcap files (what DPDK's net_pcap reads and writes), without a library.

A test writes the frames a testpmd port sends (``rx_pcap=``) and reads back
what another port received (``tx_pcap=``) to compare them byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
MAGIC = 0xA1B2C3D4  # microsecond timestamps, little-endian here
MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1


def write_pcap(path: Path, frames: Iterable[bytes]) -> None:
    out = bytearray(_GLOBAL.pack(MAGIC, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
    for i, frame in enumerate(frames):
        out += _RECORD.pack(i // 1_000_000, i % 1_000_000, len(frame), len(frame)) + frame
    path.write_bytes(bytes(out))


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if len(data) < _GLOBAL.size:
        return []
    magic = _GLOBAL.unpack_from(data)[0]
    if magic not in (MAGIC, MAGIC_NS):
        raise ValueError(f"{path}: not a little-endian pcap file (magic {magic:#x})")
    frames = []
    at = _GLOBAL.size
    while at + _RECORD.size <= len(data):
        _, _, caplen, _ = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        frames.append(data[at : at + caplen])
        at += caplen
    return frames
