"""Sans-IO vhost-user wire protocol: bytes + fds in, typed messages out, bytes back.

No sockets and no trio here (h11 style): `vhostd/` owns the I/O. `Framer` parses one direction
of a channel; `encode_request`/`encode_reply`/`encode_ack` produce bytes to send.
"""

from .encode import encode_ack, encode_reply, encode_request
from .enums import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    DeviceStatus,
    FrontendRequest,
    HeaderFlag,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
    VirtioFeature,
)
from .errors import ErrorKind, ProtocolError
from .framer import Framer
from .messages import Message
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

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "ConfigSpace",
    "DeviceStatus",
    "ErrorKind",
    "Framer",
    "FrontendRequest",
    "HeaderFlag",
    "InflightInfo",
    "IotlbMsg",
    "IotlbPerm",
    "IotlbType",
    "LogInfo",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "Payload",
    "ProtocolError",
    "ProtocolFeature",
    "SingleMemoryRegion",
    "VirtioFeature",
    "VringAddr",
    "VringArea",
    "VringFd",
    "VringState",
    "encode_ack",
    "encode_reply",
    "encode_request",
]
