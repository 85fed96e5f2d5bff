"""Typed payloads, one frozen dataclass per payload layout of the wire protocol.

They hold decoded values only: the byte layouts live in `_structs`, and the choice of payload per
request code lives in `_rules`. Values are checked here only as far as the wire format goes (field
widths); whether a value makes sense (an index in range, a range that does not overflow) is for
the daemon to decide.
"""

from __future__ import annotations

from dataclasses import dataclass

from .enums import IotlbPerm, IotlbType


@dataclass(frozen=True, slots=True)
class VringState:
    """index u32, num u32: SET_VRING_NUM/BASE/ENABLE/ENDIAN, GET_VRING_BASE, VRING_KICK/CALL/ERR.

    `num` of a GET_VRING_BASE request is junk (DPDK sends stale values): do not read it.
    """

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR. Addresses are front-end user addresses, or IOVAs with a device IOTLB."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @property
    def log_enabled(self) -> bool:
        """Bit 0 of flags (VHOST_VRING_F_LOG): `log` is valid and used-ring writes are logged."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of guest memory: mmap the region's fd at mmap_offset for memory_size bytes."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: up to MAX_MEM_REGIONS regions, one fd each, in the same order."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG (a u64 of padding, then one region)."""

    region: MemoryRegion


@dataclass(frozen=True, slots=True)
class LogInfo:
    """SET_LOG_BASE: where the dirty log lives in the fd that comes with the message."""

    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """struct vhost_iotlb_msg: IOTLB_MSG on the main channel and on the back-end channel."""

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType

    @property
    def end(self) -> int:
        """First IOVA past the range; may be exactly 2**64 (QEMU's flush-all) or beyond (bad)."""
        return self.iova + self.size


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: a window of the device config space. `size == len(payload)`."""

    offset: int
    size: int
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class InflightInfo:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD shared buffer description."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: a vring index and whether an fd comes with it."""

    index: int
    no_fd: bool


@dataclass(frozen=True, slots=True)
class VringArea:
    """Back-end VRING_HOST_NOTIFIER_MSG: u64 like VringFd, then mmap size and offset."""

    index: int
    no_fd: bool
    size: int
    offset: int


Payload = (
    int
    | VringState
    | VringAddr
    | MemoryTable
    | SingleMemoryRegion
    | LogInfo
    | IotlbMsg
    | ConfigSpace
    | InflightInfo
    | VringFd
    | VringArea
    | None
)
"""What a message carries. `int` is a plain u64; None means no payload (or one not decoded)."""
