"""Every framing bad input from the notes: what is raised, what is skipped, which fds come back."""

from __future__ import annotations

import pytest
from conftest import drain, feed, h

from protocol import (
    MAX_PAYLOAD,
    BackendRequest,
    ErrorKind,
    Framer,
    FrontendRequest,
    HeaderFlag,
    Message,
    ProtocolError,
    VringFd,
    VringState,
)

F = FrontendRequest
GET_FEATURES = h("01000000 01000000 00000000")
OK = Message(F.GET_FEATURES, HeaderFlag.VERSION, None, [])
CALL1 = h("0d000000 01000000 08000000 0100000000000000")  # SET_VRING_CALL 1, one fd
CALL1_MSG = Message(F.SET_VRING_CALL, HeaderFlag.VERSION, VringFd(1, False), [99])


def raises(framer: Framer) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        framer.next_message()
    return info.value


def skipped(wire: bytes, fds: list[int] | None = None, **kw: bool) -> ProtocolError:
    """Feed a bad message followed by a good one: the error is non-fatal and framing goes on.

    Both arrive before the first next_message(). Without fds they come in one chunk; with fds the
    bad message's chunk ends at its last byte, as Linux delivers it (a read stops right after the
    data that carried fds), and the good message follows in a chunk of its own.
    """
    framer = Framer(F, **kw)
    if fds:
        framer.receive_data(wire, fds)
        framer.receive_data(GET_FEATURES)
    else:
        framer.receive_data(wire + GET_FEATURES)
    error = raises(framer)
    assert not error.fatal
    assert error.fds == (fds or [])
    assert framer.next_message() == OK
    assert framer.next_message() is None
    return error


def fatal(wire: bytes, fds: list[int] | None = None) -> ProtocolError:
    """Feed a bad header: the error is fatal, carries the fds, and every later call fails too."""
    framer = Framer(F)
    framer.receive_data(wire, fds or [])
    error = raises(framer)
    assert error.fatal
    assert error.fds == (fds or [])
    framer.receive_data(GET_FEATURES, [77])
    again = raises(framer)
    assert again.fatal and again.kind == error.kind
    assert again.fds == [77]
    assert framer.pending_fds() == []
    framer.eof()  # already failed: nothing more to report
    return error


# --- fatal: the stream cannot be trusted


def test_size_beyond_limit_is_fatal_before_the_payload_arrives() -> None:
    error = fatal(h("16000000 01000000 01100000"), [3])
    assert error.kind is ErrorKind.OVERSIZE
    assert error.code == 22
    assert "4097" in str(error)


def test_size_at_limit_is_buffered() -> None:
    framer = Framer(F)
    framer.receive_data(h("63000000 01000000 00100000") + bytes(MAX_PAYLOAD - 1))
    assert framer.next_message() is None
    framer.receive_data(b"\0" + GET_FEATURES)
    assert raises(framer).kind is ErrorKind.UNKNOWN_REQUEST
    assert framer.next_message() == OK


@pytest.mark.parametrize("flags", ["00000000", "02000000", "03000000", "06000000"])
def test_wrong_version_is_fatal(flags: str) -> None:
    error = fatal(h("01000000" + flags + "00000000"), [4, 5])
    assert error.kind is ErrorKind.BAD_VERSION
    assert str(error).startswith("bad_version: ")


@pytest.mark.parametrize("flags", ["11000000", "01010000", "01000080", "05000100"])
def test_reserved_flag_bits_are_fatal(flags: str) -> None:
    error = fatal(h("01000000" + flags + "00000000"))
    assert error.kind is ErrorKind.BAD_FLAGS


def test_peer_closing_mid_header() -> None:
    framer = Framer(F)
    framer.receive_data(h("01000000 01"), [6])
    assert framer.next_message() is None
    with pytest.raises(ProtocolError) as info:
        framer.eof()
    assert info.value.kind is ErrorKind.TRUNCATED
    assert info.value.fatal and info.value.fds == [6] and info.value.code is None
    assert framer.pending_fds() == []


def test_peer_closing_mid_payload() -> None:
    framer = Framer(F)
    framer.receive_data(h("0c000000 01000000 08000000 010000"), [7])
    assert framer.next_message() is None
    with pytest.raises(ProtocolError) as info:
        framer.eof()
    assert info.value.kind is ErrorKind.TRUNCATED
    assert info.value.fatal and info.value.fds == [7] and info.value.code == 12


def test_clean_eof_is_silent() -> None:
    framer = Framer(F)
    assert feed(framer, GET_FEATURES) == [OK]
    framer.eof()


def test_fds_without_any_message_at_eof() -> None:
    framer = Framer(F)
    framer.receive_data(b"", [8, 9])
    assert framer.next_message() is None
    with pytest.raises(ProtocolError) as info:
        framer.eof()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == [8, 9]


# --- non-fatal: the message is skipped, framing continues


@pytest.mark.parametrize("code", ["00000000", "29000000", "ffffffff"])
def test_unknown_request_or_request_0_is_skipped_with_its_payload(code: str) -> None:
    error = skipped(h(code + "09000000 04000000 deadbeef"), [10])
    assert error.kind is ErrorKind.UNKNOWN_REQUEST
    assert error.code == int.from_bytes(h(code), "little")
    assert error.need_reply  # the caller may answer it with a failure ack


def test_backend_code_space_is_separate() -> None:
    framer = Framer(BackendRequest)
    framer.receive_data(h("06000000 01000000 00000000"))
    assert raises(framer).kind is ErrorKind.UNKNOWN_REQUEST


def test_reply_bit_in_a_request() -> None:
    error = skipped(h("0b000000 05000000 08000000 0000000000000000"))
    assert error.kind is ErrorKind.BAD_FLAGS
    assert "REPLY" in str(error)


def test_need_reply_on_a_reply() -> None:
    wire = h("01000000 0d000000 08000000 0000000000000000")
    error = skipped(wire, expect_replies=True)
    assert error.kind is ErrorKind.BAD_FLAGS


def test_requests_still_parse_when_replies_are_expected() -> None:
    assert feed(Framer(F, expect_replies=True), GET_FEATURES) == [OK]


@pytest.mark.parametrize(
    ("wire", "fds"),
    [
        ("01000000 01000000 00000000", [11]),  # GET_FEATURES carries no fd
        ("0c000000 01000000 08000000 0000000000000000", []),  # kick without its fd
        ("0c000000 01000000 08000000 0000000000000000", [11, 12]),  # kick with an extra fd
        ("0c000000 01000000 08000000 0001000000000000", [11]),  # no-fd kick with an fd
        ("05000000 01000000 08000000 00000000 00000000", [11]),  # empty table with an fd
        (
            "05000000 01000000 28000000 01000000 00000000"
            " 0000000000000000 0010000000000000 0000000000000000 0000000000000000",
            [],
        ),  # one region, no fd
        ("15000000 01000000 00000000", []),  # SET_BACKEND_REQ_FD without its fd
        ("25000000 01000000 28000000" + " 00" * 40, [11, 12]),  # ADD_MEM_REG with 2 fds
        ("26000000 01000000 28000000" + " 00" * 40, [11, 12]),  # REM_MEM_REG with 2 fds
        ("1f000000 01000000 18000000" + " 00" * 24, [11]),  # GET_INFLIGHT_FD request with fd
        ("01000000 01000000 00000000", list(range(20, 29))),  # more than MAX_FDS
    ],
)
def test_unexpected_missing_or_extra_fds(wire: str, fds: list[int]) -> None:
    # The next message carries an fd of its own. A message without fds must not swallow it (they
    # share a chunk, as Linux may deliver them), and extra fds must not leak into it (the bad
    # message's fds end its chunk, as Linux delivers them).
    wire_bytes = h(wire)
    framer = Framer(F)
    if fds:
        framer.receive_data(wire_bytes, fds)
        framer.receive_data(CALL1, [99])
    else:
        framer.receive_data(wire_bytes + CALL1, [99])
    error = raises(framer)
    assert error.kind is ErrorKind.BAD_FDS and not error.fatal
    assert error.fds == fds
    assert drain(framer) == [CALL1_MSG]
    assert framer.pending_fds() == []


@pytest.mark.parametrize(
    "wire",
    [
        "01000000 01000000 08000000 0000000000000000",  # GET_FEATURES with a payload
        "08000000 01000000 04000000 00000000",  # short vring state
        "09000000 01000000 20000000" + " 00" * 32,  # short vring addr
        "16000000 01000000 19000000" + " 00" * 25,  # IOTLB below 26 bytes
        "16000000 01000000 21000000" + " 00" * 33,  # IOTLB beyond 32 bytes
        "05000000 01000000 04000000 00000000",  # memory table shorter than its header
        "05000000 01000000 10000000 01000000 00000000" + " 00" * 8,  # 1 region, 8 bytes
        "18000000 01000000 08000000" + " 00" * 8,  # config shorter than its header
        "19000000 01000000 10000000 00000000 06000000 00000000 00000000",  # size 6, 4 bytes
        "1f000000 01000000 14000000" + " 00" * 20,  # inflight without its padding
    ],
)
def test_bad_size_for_the_code(wire: str) -> None:
    assert skipped(h(wire)).kind is ErrorKind.BAD_SIZE


def test_bad_reply_size() -> None:
    wire = h("0b000000 05000000 00000000")  # GET_VRING_BASE reply must carry a vring state
    assert skipped(wire, expect_replies=True).kind is ErrorKind.BAD_SIZE


@pytest.mark.parametrize(
    "wire",
    [
        "05000000 01000000 08000000 09000000 00000000",  # nregions 9 > 8
        "16000000 01000000 20000000" + " 00" * 24 + " 04 02" + " 00" * 6,  # perm 4
        "16000000 01000000 20000000" + " 00" * 24 + " 03 00" + " 00" * 6,  # type 0
        "16000000 01000000 20000000" + " 00" * 24 + " 03 05" + " 00" * 6,  # type 5
        "0d000000 01000000 08000000 0002000000000000",  # unknown bit in a vring-fd u64
    ],
)
def test_bad_structural_payload_value(wire: str) -> None:
    assert skipped(h(wire)).kind is ErrorKind.BAD_PAYLOAD


def test_semantic_values_are_left_to_the_daemon() -> None:
    """Index out of range, num not a power of two, iova+size past 2**64: all decode."""
    wire = h(
        "08000000 01000000 08000000 ff000000 03000000"
        " 16000000 01000000 20000000 0000000000000000 0000000000000000 0000000000000000 00 03"
        " 000000000000"
    )
    msgs = feed(Framer(F), wire)
    assert msgs[0].payload == VringState(255, 3)
    assert msgs[1].code is F.IOTLB_MSG


def test_error_message_is_readable() -> None:
    error = skipped(h("08000000 01000000 04000000 00000000"), [3])
    text = str(error)
    assert text.startswith("bad_size: SET_VRING_NUM: payload is 4 bytes, expected 8")
    assert "request 8" in text and "skipped" in text and "1 fd" in text
