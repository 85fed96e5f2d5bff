"""Numbers of the vhost-user wire protocol: request codes, flag bits, limits.

Everything here is a fact from the specification (QEMU docs/interop/vhost-user.rst); nothing
here decides policy. Values are IntEnum/IntFlag so they compare equal to the raw wire integers.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

HEADER_SIZE = 12
"""request u32, flags u32, size u32."""
MAX_PAYLOAD = 0x1000
"""Largest payload we accept; a bigger size field means the stream cannot be trusted."""
MAX_FDS = 8
"""At most this many SCM_RIGHTS fds travel with one message."""
MAX_MEM_REGIONS = 8
"""Regions in one SET_MEM_TABLE."""
VRING_IDX_MASK = 0xFF
"""Kick/call/err u64: bits 0-7 are the vring index."""
VRING_NOFD_MASK = 0x100
"""Kick/call/err u64: bit 8 says no fd travels with the message (polling mode)."""


class FrontendRequest(IntEnum):
    """Requests the front-end (QEMU, virtio-user) sends on the main channel."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Requests the back-end sends on the back-end channel (SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class HeaderFlag(IntFlag):
    """Header flag bits. Bits 0-1 hold the version (always 1); other bits are reserved."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class ProtocolFeature(IntFlag):
    """GET/SET_PROTOCOL_FEATURES bits. Bits 20+ differ between sources: never advertise them."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class VirtioFeature(IntFlag):
    """GET/SET_FEATURES bits: virtio transport bits and virtio-net device bits in one flag."""

    NET_CSUM = 1 << 0
    NET_GUEST_CSUM = 1 << 1
    NET_CTRL_GUEST_OFFLOADS = 1 << 2
    NET_MTU = 1 << 3
    NET_MAC = 1 << 5
    NET_GUEST_TSO4 = 1 << 7
    NET_GUEST_TSO6 = 1 << 8
    NET_GUEST_ECN = 1 << 9
    NET_GUEST_UFO = 1 << 10
    NET_HOST_TSO4 = 1 << 11
    NET_HOST_TSO6 = 1 << 12
    NET_HOST_ECN = 1 << 13
    NET_HOST_UFO = 1 << 14
    NET_MRG_RXBUF = 1 << 15
    NET_STATUS = 1 << 16
    NET_CTRL_VQ = 1 << 17
    NET_CTRL_RX = 1 << 18
    NET_CTRL_VLAN = 1 << 19
    NET_GUEST_ANNOUNCE = 1 << 21
    NET_MQ = 1 << 22
    NET_CTRL_MAC_ADDR = 1 << 23
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


class IotlbType(IntEnum):
    """struct vhost_iotlb_msg type."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(IntFlag):
    """struct vhost_iotlb_msg perm: access rights of a mapping (or needed by a miss)."""

    NONE = 0
    READ = 1
    WRITE = 2
    RW = 3


class DeviceStatus(IntFlag):
    """Virtio device status byte (SET_STATUS / GET_STATUS)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128
