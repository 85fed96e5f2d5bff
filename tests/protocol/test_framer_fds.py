"""Fd association across chunk boundaries (SCM_RIGHTS semantics on a stream socket).

Rule: fds that arrive with a chunk belong to the first message whose header starts at or after
the chunk's first byte.
"""

from __future__ import annotations

import pytest
from conftest import drain, feed, h

from protocol import (
    ErrorKind,
    Framer,
    FrontendRequest,
    HeaderFlag,
    Message,
    ProtocolError,
    VringFd,
    encode_request,
)

F = FrontendRequest
V = HeaderFlag.VERSION
GET_FEATURES = h("01000000 01000000 00000000")
KICK0 = h("0c000000 01000000 08000000 0000000000000000")
CALL1 = h("0d000000 01000000 08000000 0100000000000000")


def kick(index: int, fds: list[int]) -> Message:
    return Message(F.SET_VRING_KICK, V, VringFd(index, False), fds)


def test_message_split_over_several_chunks_keeps_fds_of_the_first() -> None:
    framer = Framer(F)
    assert feed(framer, KICK0[:5], [3]) == []
    assert feed(framer, KICK0[5:12]) == []
    assert feed(framer, KICK0[12:19]) == []
    assert feed(framer, KICK0[19:]) == [kick(0, [3])]
    assert framer.pending_fds() == []


def test_byte_at_a_time() -> None:
    framer = Framer(F)
    out: list[Message] = []
    for i, byte in enumerate(KICK0 + CALL1):
        fds = [40] if i == 0 else [41] if i == len(KICK0) else []
        out += feed(framer, bytes([byte]), fds)
    assert out == [kick(0, [40]), Message(F.SET_VRING_CALL, V, VringFd(1, False), [41])]


def test_two_messages_in_one_chunk_then_fds_on_the_second_chunk() -> None:
    framer = Framer(F)
    assert feed(framer, GET_FEATURES + GET_FEATURES) == [
        Message(F.GET_FEATURES, V, None, []),
        Message(F.GET_FEATURES, V, None, []),
    ]
    assert feed(framer, KICK0, [5]) == [kick(0, [5])]


def test_fds_of_a_chunk_starting_mid_message_go_to_the_next_message() -> None:
    framer = Framer(F)
    stream = GET_FEATURES + KICK0
    framer.receive_data(stream[:6])  # half of GET_FEATURES's header
    framer.receive_data(stream[6:], [9])  # rest of GET_FEATURES + the kick, with its fd
    assert drain(framer) == [Message(F.GET_FEATURES, V, None, []), kick(0, [9])]


def test_fds_of_a_chunk_starting_mid_message_are_not_given_to_that_message() -> None:
    framer = Framer(F)
    framer.receive_data(KICK0[:10])
    framer.receive_data(KICK0[10:], [9])  # too late for this kick: belongs to a later message
    with pytest.raises(ProtocolError) as info:  # the kick came without its fd
        framer.next_message()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == []
    assert feed(framer, CALL1) == [Message(F.SET_VRING_CALL, V, VringFd(1, False), [9])]


def test_one_chunk_with_two_messages_and_the_fds_of_the_first() -> None:
    framer = Framer(F)
    assert feed(framer, KICK0 + GET_FEATURES, [3]) == [
        kick(0, [3]),
        Message(F.GET_FEATURES, V, None, []),
    ]


def test_fds_from_several_chunks_before_a_header_add_up() -> None:
    framer = Framer(F)
    table = h("05000000 01000000 48000000 02000000 00000000" + " 00" * 64)  # two regions, two fds
    framer.receive_data(GET_FEATURES[:4])
    framer.receive_data(GET_FEATURES[4:], [1])  # starts inside GET_FEATURES: for the table
    framer.receive_data(table, [2])
    msgs = drain(framer)
    assert [m.fds for m in msgs] == [[], [1, 2]]


def test_empty_chunk_with_fds_belongs_to_the_next_message() -> None:
    framer = Framer(F)
    assert feed(framer, GET_FEATURES) == [Message(F.GET_FEATURES, V, None, [])]
    assert feed(framer, b"", [4]) == []
    assert feed(framer, KICK0) == [kick(0, [4])]


def test_many_chunks_buffered_before_draining() -> None:
    framer = Framer(F)
    framer.receive_data(KICK0, [1])
    framer.receive_data(encode_request(F.SET_VRING_KICK, VringFd(1, False)), [2])
    framer.receive_data(GET_FEATURES)
    assert [m.fds for m in drain(framer)] == [[1], [2], []]


def test_pending_fds_hands_over_unclaimed_fds_once() -> None:
    framer = Framer(F)
    framer.receive_data(KICK0[:3], [5, 6])
    assert framer.next_message() is None
    assert framer.pending_fds() == [5, 6]
    assert framer.pending_fds() == []
