"""Exact byte vectors for every message kind, both directions, decoded and encoded."""

from __future__ import annotations

import pytest
from conftest import feed, h

from protocol import (
    BackendRequest,
    ConfigSpace,
    Framer,
    FrontendRequest,
    HeaderFlag,
    InflightInfo,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LogInfo,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
    encode_ack,
    encode_reply,
    encode_request,
)

F = FrontendRequest
B = BackendRequest
V = HeaderFlag.VERSION
VN = HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
VR = HeaderFlag.VERSION | HeaderFlag.REPLY
REGION = MemoryRegion(0x100000, 0x200000, 0x7F1234500000, 0x1000)
REGION_HEX = "0000100000000000 0000200000000000 00005034127f0000 0010000000000000"

# (code, flags, payload, number of fds, wire bytes)
FRONTEND_REQUESTS: list[tuple[F, HeaderFlag, Payload, int, str]] = [
    (F.GET_FEATURES, V, None, 0, "01000000 01000000 00000000"),
    (F.SET_FEATURES, V, 0x950008000, 0, "02000000 01000000 08000000 0080005009000000"),
    (F.SET_OWNER, V, None, 0, "03000000 01000000 00000000"),
    (F.RESET_OWNER, V, None, 0, "04000000 01000000 00000000"),
    (
        F.SET_MEM_TABLE,
        VN,
        MemoryTable((MemoryRegion(0x100C3E000, 0x40000000, 0x100C3E000, 0),)),
        1,
        "05000000 09000000 28000000 01000000 00000000"
        " 00e0c30001000000 0000004000000000 00e0c30001000000 0000000000000000",
    ),
    (
        F.SET_LOG_BASE,
        V,
        LogInfo(0x1000, 0x20),
        1,
        "06000000 01000000 10000000 0010000000000000 2000000000000000",
    ),
    (F.SET_LOG_FD, V, None, 1, "07000000 01000000 00000000"),
    (F.SET_VRING_NUM, V, VringState(0, 256), 0, "08000000 01000000 08000000 00000000 00010000"),
    (
        F.SET_VRING_ADDR,
        V,
        VringAddr(0, 0, 0x140BE2000, 0x140BE4000, 0x140BE3000, 0),
        0,
        "09000000 01000000 28000000 00000000 00000000"
        " 0020be4001000000 0040be4001000000 0030be4001000000 0000000000000000",
    ),
    (F.SET_VRING_BASE, V, VringState(1, 32768), 0, "0a000000 01000000 08000000 01000000 00800000"),
    # DPDK sends junk in num: it is decoded as is.
    (F.GET_VRING_BASE, V, VringState(0, 32642), 0, "0b000000 01000000 08000000 00000000 827f0000"),
    (F.SET_VRING_KICK, V, VringFd(1, False), 1, "0c000000 01000000 08000000 0100000000000000"),
    (F.SET_VRING_CALL, V, VringFd(2, True), 0, "0d000000 01000000 08000000 0201000000000000"),
    (F.SET_VRING_ERR, V, VringFd(0, False), 1, "0e000000 01000000 08000000 0000000000000000"),
    (F.GET_PROTOCOL_FEATURES, V, None, 0, "0f000000 01000000 00000000"),
    (F.SET_PROTOCOL_FEATURES, V, 0x10009, 0, "10000000 01000000 08000000 0900010000000000"),
    (F.GET_QUEUE_NUM, V, None, 0, "11000000 01000000 00000000"),
    (F.SET_VRING_ENABLE, V, VringState(1, 1), 0, "12000000 01000000 08000000 01000000 01000000"),
    (F.SEND_RARP, V, 0x563412005452, 0, "13000000 01000000 08000000 5254001234560000"),
    (F.NET_SET_MTU, VN, 1500, 0, "14000000 09000000 08000000 dc05000000000000"),
    (F.SET_BACKEND_REQ_FD, VN, None, 1, "15000000 09000000 00000000"),
    (
        F.IOTLB_MSG,
        VN,
        IotlbMsg(0x1000, 0x1000, 0x7F0000, IotlbPerm.RW, IotlbType.UPDATE),
        0,
        "16000000 09000000 20000000"
        " 0010000000000000 0010000000000000 00007f0000000000 03 02 000000000000",
    ),
    (F.SET_VRING_ENDIAN, V, VringState(0, 0), 0, "17000000 01000000 08000000 00000000 00000000"),
    (
        F.GET_CONFIG,
        V,
        ConfigSpace(0, 6, 0, bytes(6)),
        0,
        "18000000 01000000 12000000 00000000 06000000 00000000 000000000000",
    ),
    (
        F.SET_CONFIG,
        V,
        ConfigSpace(0, 6, 1, h("525400123456")),
        0,
        "19000000 01000000 12000000 00000000 06000000 01000000 525400123456",
    ),
    (F.CREATE_CRYPTO_SESSION, V, None, 0, "1a000000 01000000 00000000"),
    (F.CLOSE_CRYPTO_SESSION, V, 5, 0, "1b000000 01000000 08000000 0500000000000000"),
    (F.POSTCOPY_ADVISE, V, None, 0, "1c000000 01000000 00000000"),
    (F.POSTCOPY_LISTEN, V, None, 0, "1d000000 01000000 00000000"),
    (F.POSTCOPY_END, V, None, 0, "1e000000 01000000 00000000"),
    (
        F.GET_INFLIGHT_FD,
        V,
        InflightInfo(0, 0, 2, 256),
        0,
        "1f000000 01000000 18000000 0000000000000000 0000000000000000 0200 0001 00000000",
    ),
    (
        F.SET_INFLIGHT_FD,
        V,
        InflightInfo(0x2000, 0, 2, 256),
        1,
        "20000000 01000000 18000000 0020000000000000 0000000000000000 0200 0001 00000000",
    ),
    (F.GPU_SET_SOCKET, V, None, 1, "21000000 01000000 00000000"),
    (F.RESET_DEVICE, V, None, 0, "22000000 01000000 00000000"),
    (F.VRING_KICK, V, VringState(1, 0), 0, "23000000 01000000 08000000 01000000 00000000"),
    (F.GET_MAX_MEM_SLOTS, V, None, 0, "24000000 01000000 00000000"),
    (
        F.ADD_MEM_REG,
        VN,
        SingleMemoryRegion(REGION),
        1,
        "25000000 09000000 28000000 0000000000000000 " + REGION_HEX,
    ),
    (
        F.REM_MEM_REG,
        V,
        SingleMemoryRegion(REGION),
        0,
        "26000000 01000000 28000000 0000000000000000 " + REGION_HEX,
    ),
    (F.SET_STATUS, VN, 0xB, 0, "27000000 09000000 08000000 0b00000000000000"),
    (F.GET_STATUS, V, None, 0, "28000000 01000000 00000000"),
]

BACKEND_REQUESTS: list[tuple[B, HeaderFlag, Payload, int, str]] = [
    (
        B.IOTLB_MSG,
        V,
        IotlbMsg(0xFEE00000, 0, 0, IotlbPerm.READ, IotlbType.MISS),
        0,
        "01000000 01000000 20000000"
        " 0000e0fe00000000 0000000000000000 0000000000000000 01 01 000000000000",
    ),
    (B.CONFIG_CHANGE_MSG, VN, None, 0, "02000000 09000000 00000000"),
    (
        B.VRING_HOST_NOTIFIER_MSG,
        V,
        VringArea(1, False, 0x1000, 0),
        1,
        "03000000 01000000 18000000 0100000000000000 0010000000000000 0000000000000000",
    ),
    (B.VRING_CALL, V, VringState(1, 0), 0, "04000000 01000000 08000000 01000000 00000000"),
    (B.VRING_ERR, V, VringState(0, 0), 0, "05000000 01000000 08000000 00000000 00000000"),
]

# Replies: flags are always exactly 0x5.
FRONTEND_REPLIES: list[tuple[F, Payload, int, str]] = [
    (F.GET_FEATURES, 0xD7C66E7CB, 0, "01000000 05000000 08000000 cbe7667c0d000000"),
    (F.GET_PROTOCOL_FEATURES, 0x10CBF, 0, "0f000000 05000000 08000000 bf0c010000000000"),
    (F.SET_MEM_TABLE, 0, 0, "05000000 05000000 08000000 0000000000000000"),
    (F.IOTLB_MSG, 1, 0, "16000000 05000000 08000000 0100000000000000"),
    (F.GET_VRING_BASE, VringState(1, 52032), 0, "0b000000 05000000 08000000 01000000 40cb0000"),
    (
        F.GET_CONFIG,
        ConfigSpace(0, 6, 0, h("525400123456")),
        0,
        "18000000 05000000 12000000 00000000 06000000 00000000 525400123456",
    ),
    (
        F.GET_INFLIGHT_FD,
        InflightInfo(0x2000, 0, 2, 256),
        1,
        "1f000000 05000000 18000000 0020000000000000 0000000000000000 0200 0001 00000000",
    ),
    (F.GET_STATUS, 0xF, 0, "28000000 05000000 08000000 0f00000000000000"),
]
BACKEND_REPLIES: list[tuple[B, Payload, int, str]] = [
    (B.IOTLB_MSG, 0, 0, "01000000 05000000 08000000 0000000000000000"),
    (B.CONFIG_CHANGE_MSG, 1, 0, "02000000 05000000 08000000 0100000000000000"),
]


def _ids(rows: list[tuple[object, ...]]) -> list[str]:
    return [getattr(row[0], "name", "?") for row in rows]


def test_every_request_code_has_a_vector() -> None:
    assert {row[0] for row in FRONTEND_REQUESTS} == set(FrontendRequest)
    assert {row[0] for row in BACKEND_REQUESTS} == set(BackendRequest)


@pytest.mark.parametrize(
    ("codes", "code", "flags", "payload", "nfds", "wire"),
    [(F, *row) for row in FRONTEND_REQUESTS] + [(B, *row) for row in BACKEND_REQUESTS],
    ids=_ids(FRONTEND_REQUESTS) + ["backend-" + i for i in _ids(BACKEND_REQUESTS)],
)
def test_request_vectors(
    codes: type[F] | type[B],
    code: F | B,
    flags: HeaderFlag,
    payload: Payload,
    nfds: int,
    wire: str,
) -> None:
    fds = list(range(100, 100 + nfds))
    assert feed(Framer(codes), h(wire), fds) == [Message(code, flags, payload, fds)]
    need_reply = bool(flags & HeaderFlag.NEED_REPLY)
    assert encode_request(code, payload, need_reply=need_reply) == h(wire)


@pytest.mark.parametrize(
    ("codes", "code", "payload", "nfds", "wire"),
    [(F, *row) for row in FRONTEND_REPLIES] + [(B, *row) for row in BACKEND_REPLIES],
    ids=_ids(FRONTEND_REPLIES) + ["backend-" + i for i in _ids(BACKEND_REPLIES)],
)
def test_reply_vectors(
    codes: type[F] | type[B], code: F | B, payload: Payload, nfds: int, wire: str
) -> None:
    fds = list(range(200, 200 + nfds))
    framer = Framer(codes, expect_replies=True)
    assert feed(framer, h(wire), fds) == [Message(code, VR, payload, fds)]
    assert encode_reply(code, payload) == h(wire)


def test_mem_table_with_two_regions() -> None:
    wire = h(
        "05000000 01000000 48000000 02000000 00000000"
        " 0000000000000000 00000a0000000000 0000007f00000000 0000000000000000"
        " 0000100000000000 0000200000000000 00005034127f0000 0010000000000000"
    )
    table = MemoryTable((MemoryRegion(0, 0xA0000, 0x7F000000, 0), REGION))
    assert encode_request(F.SET_MEM_TABLE, table) == wire
    assert feed(Framer(F), wire, [5, 6]) == [Message(F.SET_MEM_TABLE, V, table, [5, 6])]


def test_empty_mem_table_needs_no_fd() -> None:
    wire = h("05000000 01000000 08000000 00000000 00000000")
    assert encode_request(F.SET_MEM_TABLE, MemoryTable(())) == wire
    assert feed(Framer(F), wire) == [Message(F.SET_MEM_TABLE, V, MemoryTable(()), [])]


def test_host_notifier_without_fd() -> None:
    wire = h("03000000 01000000 18000000 0101000000000000 0000000000000000 0000000000000000")
    area = VringArea(1, True, 0, 0)
    assert encode_request(B.VRING_HOST_NOTIFIER_MSG, area) == wire
    assert feed(Framer(B), wire) == [Message(B.VRING_HOST_NOTIFIER_MSG, V, area, [])]


def test_iotlb_without_c_padding_is_accepted() -> None:
    """Some senders send only the 26 meaningful bytes of struct vhost_iotlb_msg."""
    wire = h("16000000 01000000 1a000000 0000000000000000 0000000000000000 0000000000000000 00 03")
    expected = IotlbMsg(0, 0, 0, IotlbPerm.NONE, IotlbType.INVALIDATE)
    assert feed(Framer(F), wire) == [Message(F.IOTLB_MSG, V, expected, [])]


def test_opaque_payload_is_skipped_not_decoded() -> None:
    wire = h("1a000000 01000000 04000000 deadbeef 03000000 01000000 00000000")
    assert feed(Framer(F), wire) == [
        Message(F.CREATE_CRYPTO_SESSION, V, None, []),
        Message(F.SET_OWNER, V, None, []),
    ]


def test_rem_mem_reg_accepts_a_stray_fd() -> None:
    """The spec lets back-ends accept (and close) one fd that old QEMUs send."""
    wire = h("26000000 01000000 28000000 0000000000000000 " + REGION_HEX)
    assert feed(Framer(F), wire, [9]) == [
        Message(F.REM_MEM_REG, V, SingleMemoryRegion(REGION), [9])
    ]


def test_acks() -> None:
    assert encode_ack(F.SET_MEM_TABLE, True) == h("05000000 05000000 08000000 0000000000000000")
    assert encode_ack(F.IOTLB_MSG, False) == h("16000000 05000000 08000000 0100000000000000")
    assert encode_ack(B.IOTLB_MSG, True) == h("01000000 05000000 08000000 0000000000000000")


@pytest.mark.parametrize("code", [F.GET_VRING_BASE, F.GET_CONFIG, F.GET_INFLIGHT_FD])
def test_no_ack_for_requests_with_a_reply_body(code: F) -> None:
    with pytest.raises(ValueError, match="reply body"):
        encode_ack(code, True)


def test_message_properties() -> None:
    (msg,) = feed(Framer(F, expect_replies=True), h("0b000000 05000000 08000000 0000000000000000"))
    assert msg.is_reply and not msg.need_reply
    (msg,) = feed(Framer(F), h("27000000 09000000 08000000 0f00000000000000"))
    assert msg.need_reply and not msg.is_reply


@pytest.mark.parametrize(
    ("code", "payload", "error"),
    [
        (F.SET_VRING_NUM, 5, TypeError),  # wrong payload type for the code
        (F.GET_FEATURES, 0, TypeError),  # request without payload
        (F.SET_FEATURES, 2**64, ValueError),
        (F.SET_VRING_KICK, VringFd(256, False), ValueError),
        (F.SET_CONFIG, ConfigSpace(0, 5, 0, b"abc"), ValueError),
        (F.SET_MEM_TABLE, MemoryTable((REGION,) * 9), ValueError),
    ],
)
def test_encoder_rejects_bad_payloads(code: F, payload: Payload, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_request(code, payload)


def test_encoder_needs_an_enum_code() -> None:
    with pytest.raises(TypeError):
        encode_request(1, None)  # type: ignore[arg-type]
