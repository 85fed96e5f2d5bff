"""Byte layouts of the wire format (x86-64 C layout, little endian), each defined exactly once.

Layouts are written with `construct` and compiled at import. The variable-length ones (memory
table, config space) are parsed and built with the compiled construct. The fixed-size ones are on
the hot path (IOTLB messages arrive at ~100k/s), so `fixed()` derives an equivalent precompiled
`struct.Struct` from the same construct definition: one definition, two speeds of access.
"""

from __future__ import annotations

import struct
from typing import Any

from construct import (
    Array,
    Bytes,
    FormatField,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padded,
    Padding,
    Pass,
    Renamed,
    Struct,
    this,
)


def fixed(layout: Any) -> struct.Struct:
    """The `struct.Struct` equivalent of a fixed-size construct Struct (padding becomes 'x')."""

    def fmt(con: Any) -> str:
        if isinstance(con, Renamed):
            return fmt(con.subcon)
        if isinstance(con, FormatField):
            return str(con.fmtstr[1:])
        if isinstance(con, Padded) and isinstance(con.subcon, type(Pass)):
            return f"{con.length}x"
        if isinstance(con, Struct):
            return "".join(fmt(sub) for sub in con.subcons)
        raise TypeError(f"not a fixed-size layout element: {con!r}")

    derived = struct.Struct("<" + fmt(layout))
    assert derived.size == layout.sizeof()
    return derived


HEADER = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)
U64 = Struct("value" / Int64ul)
VRING_STATE = Struct("index" / Int32ul, "num" / Int32ul)
VRING_ADDR = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc" / Int64ul,
    "used" / Int64ul,
    "avail" / Int64ul,
    "log" / Int64ul,
)
MEMORY_REGION = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
MEMORY_TABLE_HEADER = Struct("nregions" / Int32ul, Padding(4))
MEMORY_TABLE = Struct(*MEMORY_TABLE_HEADER.subcons, "regions" / Array(this.nregions, MEMORY_REGION))
SINGLE_REGION = Struct(Padding(8), "region" / MEMORY_REGION)
LOG = Struct("mmap_size" / Int64ul, "mmap_offset" / Int64ul)
IOTLB_FIELDS = Struct(
    "iova" / Int64ul,
    "size" / Int64ul,
    "uaddr" / Int64ul,
    "perm" / Int8ul,
    "type" / Int8ul,
)
"""The 26 meaningful bytes of struct vhost_iotlb_msg; senders add 6 bytes of C padding."""
IOTLB = Struct(*IOTLB_FIELDS.subcons, Padding(6))
CONFIG_HEADER = Struct("offset" / Int32ul, "size" / Int32ul, "flags" / Int32ul)
CONFIG = Struct(*CONFIG_HEADER.subcons, "payload" / Bytes(this.size))
INFLIGHT = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    Padding(4),
)
VRING_AREA = Struct("u64" / Int64ul, "size" / Int64ul, "offset" / Int64ul)

# Compiled constructs for the variable-length layouts.
MEMORY_TABLE_C = MEMORY_TABLE.compile()
CONFIG_C = CONFIG.compile()

# Precompiled struct.Structs for the fixed-size layouts.
HEADER_S = fixed(HEADER)
U64_S = fixed(U64)
VRING_STATE_S = fixed(VRING_STATE)
VRING_ADDR_S = fixed(VRING_ADDR)
MEMORY_REGION_S = fixed(MEMORY_REGION)
MEMORY_TABLE_HEADER_S = fixed(MEMORY_TABLE_HEADER)
SINGLE_REGION_S = fixed(SINGLE_REGION)
LOG_S = fixed(LOG)
IOTLB_FIELDS_S = fixed(IOTLB_FIELDS)
IOTLB_S = fixed(IOTLB)
CONFIG_HEADER_S = fixed(CONFIG_HEADER)
INFLIGHT_S = fixed(INFLIGHT)
VRING_AREA_S = fixed(VRING_AREA)
