"""Decoders and encoders per payload kind (see `_rules.Kind`).

Decoders read straight from the framer's buffer at an offset (no copies on the hot path) and
raise `PayloadError` for a size or value the wire format does not allow. Encoders raise
TypeError/ValueError: a bad payload handed to an encoder is a bug in our code, not peer input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from construct import ConstructError

from . import _structs as s
from ._rules import Kind
from .enums import MAX_MEM_REGIONS, VRING_IDX_MASK, VRING_NOFD_MASK, IotlbPerm, IotlbType
from .errors import ErrorKind
from .payloads import (
    ConfigSpace,
    InflightInfo,
    IotlbMsg,
    LogInfo,
    MemoryRegion,
    MemoryTable,
    Payload,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
)

IOTLB_MIN_SIZE = s.IOTLB_FIELDS_S.size
"""26: senders send 32 (C padding), we also take the bare fields."""
_VRING_FD_BITS = VRING_IDX_MASK | VRING_NOFD_MASK
# dict lookups double as domain checks and avoid enum construction per message.
_PERMS = {int(p): p for p in (IotlbPerm.NONE, IotlbPerm.READ, IotlbPerm.WRITE, IotlbPerm.RW)}
_TYPES = {int(t): t for t in IotlbType}


class PayloadError(Exception):
    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


Decoder = Callable[[bytearray, int, int], Payload]


def _need(size: int, expected: int) -> None:
    if size != expected:
        raise PayloadError(ErrorKind.BAD_SIZE, f"payload is {size} bytes, expected {expected}")


def _empty(buf: bytearray, off: int, size: int) -> None:
    _need(size, 0)


def _opaque(buf: bytearray, off: int, size: int) -> None:
    return None


def _u64(buf: bytearray, off: int, size: int) -> int:
    _need(size, 8)
    value: int = s.U64_S.unpack_from(buf, off)[0]
    return value


def _vring_fd(buf: bytearray, off: int, size: int) -> VringFd:
    value = _u64(buf, off, size)
    if value & ~_VRING_FD_BITS:
        raise PayloadError(ErrorKind.BAD_PAYLOAD, f"unknown bits in vring fd u64 {value:#x}")
    return VringFd(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))


def _vring_state(buf: bytearray, off: int, size: int) -> VringState:
    _need(size, 8)
    return VringState(*s.VRING_STATE_S.unpack_from(buf, off))


def _vring_addr(buf: bytearray, off: int, size: int) -> VringAddr:
    _need(size, 40)
    return VringAddr(*s.VRING_ADDR_S.unpack_from(buf, off))


def _mem_table(buf: bytearray, off: int, size: int) -> MemoryTable:
    if size < s.MEMORY_TABLE_HEADER_S.size:
        raise PayloadError(ErrorKind.BAD_SIZE, f"memory table of {size} bytes")
    (nregions,) = s.MEMORY_TABLE_HEADER_S.unpack_from(buf, off)
    if nregions > MAX_MEM_REGIONS:
        raise PayloadError(ErrorKind.BAD_PAYLOAD, f"nregions {nregions} > {MAX_MEM_REGIONS}")
    _need(size, s.MEMORY_TABLE_HEADER_S.size + s.MEMORY_REGION_S.size * nregions)
    parsed = s.MEMORY_TABLE_C.parse(bytes(buf[off : off + size]))
    return MemoryTable(
        tuple(
            MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in parsed.regions
        )
    )


def _single_region(buf: bytearray, off: int, size: int) -> SingleMemoryRegion:
    _need(size, 40)
    return SingleMemoryRegion(MemoryRegion(*s.SINGLE_REGION_S.unpack_from(buf, off)))


def _log(buf: bytearray, off: int, size: int) -> LogInfo:
    _need(size, 16)
    return LogInfo(*s.LOG_S.unpack_from(buf, off))


def _iotlb(buf: bytearray, off: int, size: int) -> IotlbMsg:
    if not IOTLB_MIN_SIZE <= size <= s.IOTLB_S.size:
        raise PayloadError(ErrorKind.BAD_SIZE, f"IOTLB message of {size} bytes")
    iova, length, uaddr, perm, type_ = s.IOTLB_FIELDS_S.unpack_from(buf, off)
    typ = _TYPES.get(type_)
    if typ is None:
        raise PayloadError(ErrorKind.BAD_PAYLOAD, f"IOTLB type {type_} not in 1..4")
    perm_ = _PERMS.get(perm)
    if perm_ is None and typ is IotlbType.INVALIDATE:
        perm_ = IotlbPerm.NONE  # QEMU leaves an invalidation's perm uninitialised (stack bytes)
    if perm_ is None:
        raise PayloadError(ErrorKind.BAD_PAYLOAD, f"IOTLB perm {perm} > 3")
    return IotlbMsg(iova, length, uaddr, perm_, typ)


def _config(buf: bytearray, off: int, size: int) -> ConfigSpace:
    header = s.CONFIG_HEADER_S.size
    if size < header:
        raise PayloadError(ErrorKind.BAD_SIZE, f"config payload of {size} bytes")
    _offset, csize, _flags = s.CONFIG_HEADER_S.unpack_from(buf, off)
    if csize != size - header:
        raise PayloadError(
            ErrorKind.BAD_SIZE, f"config size field {csize} but {size - header} bytes follow"
        )
    c = s.CONFIG_C.parse(bytes(buf[off : off + size]))
    return ConfigSpace(c.offset, c.size, c.flags, bytes(c.payload))


def _inflight(buf: bytearray, off: int, size: int) -> InflightInfo:
    _need(size, 24)
    return InflightInfo(*s.INFLIGHT_S.unpack_from(buf, off))


def _vring_area(buf: bytearray, off: int, size: int) -> VringArea:
    _need(size, 24)
    value, length, offset = s.VRING_AREA_S.unpack_from(buf, off)
    if value & ~_VRING_FD_BITS:
        raise PayloadError(ErrorKind.BAD_PAYLOAD, f"unknown bits in vring area u64 {value:#x}")
    return VringArea(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK), length, offset)


DECODERS: dict[Kind, Decoder] = {
    Kind.EMPTY: _empty,
    Kind.OPAQUE: _opaque,
    Kind.U64: _u64,
    Kind.VRING_FD: _vring_fd,
    Kind.VRING_STATE: _vring_state,
    Kind.VRING_ADDR: _vring_addr,
    Kind.MEM_TABLE: _mem_table,
    Kind.SINGLE_REGION: _single_region,
    Kind.LOG: _log,
    Kind.IOTLB: _iotlb,
    Kind.CONFIG: _config,
    Kind.INFLIGHT: _inflight,
    Kind.VRING_AREA: _vring_area,
}


def _region_fields(r: MemoryRegion) -> tuple[int, int, int, int]:
    return (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def _vring_fd_u64(index: int, no_fd: bool) -> int:
    if not 0 <= index <= VRING_IDX_MASK:
        raise ValueError(f"vring index {index} does not fit in 8 bits")
    return index | (VRING_NOFD_MASK if no_fd else 0)


def _build(kind: Kind, p: Any) -> bytes:
    """Encode `p` as `kind`; the isinstance checks are the encoder's contract with callers."""
    if kind in (Kind.EMPTY, Kind.OPAQUE) and p is None:
        return b""
    if kind is Kind.U64 and isinstance(p, int):
        return s.U64_S.pack(p)
    if kind is Kind.VRING_FD and isinstance(p, VringFd):
        return s.U64_S.pack(_vring_fd_u64(p.index, p.no_fd))
    if kind is Kind.VRING_STATE and isinstance(p, VringState):
        return s.VRING_STATE_S.pack(p.index, p.num)
    if kind is Kind.VRING_ADDR and isinstance(p, VringAddr):
        return s.VRING_ADDR_S.pack(p.index, p.flags, p.desc, p.used, p.avail, p.log)
    if kind is Kind.MEM_TABLE and isinstance(p, MemoryTable):
        if len(p.regions) > MAX_MEM_REGIONS:
            raise ValueError(f"{len(p.regions)} regions > {MAX_MEM_REGIONS}")
        regions = [
            dict(
                zip(
                    ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"),
                    _region_fields(r),
                    strict=True,
                )
            )
            for r in p.regions
        ]
        return bytes(s.MEMORY_TABLE_C.build({"nregions": len(regions), "regions": regions}))
    if kind is Kind.SINGLE_REGION and isinstance(p, SingleMemoryRegion):
        return s.SINGLE_REGION_S.pack(*_region_fields(p.region))
    if kind is Kind.LOG and isinstance(p, LogInfo):
        return s.LOG_S.pack(p.mmap_size, p.mmap_offset)
    if kind is Kind.IOTLB and isinstance(p, IotlbMsg):
        return s.IOTLB_S.pack(p.iova, p.size, p.uaddr, p.perm, p.type)
    if kind is Kind.CONFIG and isinstance(p, ConfigSpace):
        if p.size != len(p.payload):
            raise ValueError(f"config size {p.size} != len(payload) {len(p.payload)}")
        return bytes(
            s.CONFIG_C.build(
                {"offset": p.offset, "size": p.size, "flags": p.flags, "payload": p.payload}
            )
        )
    if kind is Kind.INFLIGHT and isinstance(p, InflightInfo):
        return s.INFLIGHT_S.pack(p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size)
    if kind is Kind.VRING_AREA and isinstance(p, VringArea):
        return s.VRING_AREA_S.pack(_vring_fd_u64(p.index, p.no_fd), p.size, p.offset)
    raise TypeError(f"payload {p!r} does not fit a {kind.name} payload")


def encode_payload(kind: Kind, payload: Payload) -> bytes:
    """Bytes of `payload` laid out as `kind`. Out-of-range field values raise ValueError."""
    try:
        return _build(kind, payload)
    except (struct.error, ConstructError) as exc:
        raise ValueError(f"cannot encode {payload!r}: {exc}") from exc
