"""Fd association across chunk boundaries (SCM_RIGHTS semantics on a stream socket).

Rule: fds that arrive with a chunk are anchored at the chunk's last byte and belong to the message
holding that byte; a message claims every fd group anchored before its end. This is what Linux
delivers: each sender writes one message per sendmsg(), the fds ride on that message's first
segment, and a unix stream read stops right after the segment whose fds it returns (it may glue
fd-less data before that segment, never data after it).
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
SET_PROTOCOL_FEATURES = h("10000000 01000000 08000000 0000000000000000")
KICK0 = h("0c000000 01000000 08000000 0000000000000000")
CALL1 = h("0d000000 01000000 08000000 0100000000000000")
TABLE2 = h("05000000 01000000 48000000 02000000 00000000" + " 00" * 64)  # two regions, two fds
FEATURES_MSG = Message(F.GET_FEATURES, V, None, [])


def kick(index: int, fds: list[int]) -> Message:
    return Message(F.SET_VRING_KICK, V, VringFd(index, False), fds)


def call(index: int, fds: list[int]) -> Message:
    return Message(F.SET_VRING_CALL, V, VringFd(index, False), fds)


def test_dpdk_fd_less_message_and_fd_message_in_one_read() -> None:
    """DPDK sends SET_PROTOCOL_FEATURES (no fd) then SET_VRING_CALL (one fd) back to back, and one
    recvmsg returns both messages' bytes with the fd: the fd is the second message's."""
    framer = Framer(F)
    assert feed(framer, SET_PROTOCOL_FEATURES + CALL1, [7]) == [
        Message(F.SET_PROTOCOL_FEATURES, V, 0, []),
        call(1, [7]),
    ]
    assert framer.pending_fds() == []


def test_read_ending_inside_an_fd_message_brings_its_fds() -> None:
    """A short read stops inside the fd-carrying message: its fds come with that first part. The
    next read may glue the rest of it to fd-less data and to the start of the next fd message."""
    framer = Framer(F)
    assert feed(framer, GET_FEATURES + KICK0[:7], [3]) == [FEATURES_MSG]
    assert feed(framer, KICK0[7:] + GET_FEATURES + CALL1[:14], [4]) == [kick(0, [3]), FEATURES_MSG]
    assert feed(framer, CALL1[14:]) == [call(1, [4])]
    assert framer.pending_fds() == []
    framer.eof()


def test_read_ending_on_the_last_byte_of_an_fd_message() -> None:
    framer = Framer(F)
    framer.receive_data(GET_FEATURES + KICK0, [3])  # ends exactly at the kick's last byte
    framer.receive_data(GET_FEATURES)
    assert drain(framer) == [FEATURES_MSG, kick(0, [3]), FEATURES_MSG]


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
    assert out == [kick(0, [40]), call(1, [41])]


def test_two_messages_in_one_chunk_then_fds_on_the_second_chunk() -> None:
    framer = Framer(F)
    assert feed(framer, GET_FEATURES + GET_FEATURES) == [FEATURES_MSG, FEATURES_MSG]
    assert feed(framer, KICK0, [5]) == [kick(0, [5])]


def test_fds_of_a_chunk_starting_mid_message_go_to_the_message_holding_its_last_byte() -> None:
    framer = Framer(F)
    stream = GET_FEATURES + KICK0
    framer.receive_data(stream[:6])  # half of GET_FEATURES's header
    framer.receive_data(stream[6:], [9])  # rest of GET_FEATURES + the kick, with its fd
    assert drain(framer) == [FEATURES_MSG, kick(0, [9])]


def test_fds_of_a_chunk_starting_mid_message_are_not_given_to_that_message() -> None:
    framer = Framer(F)
    framer.receive_data(KICK0[:10])
    framer.receive_data(KICK0[10:] + CALL1, [9])  # ends in the call: the call's fd
    with pytest.raises(ProtocolError) as info:  # the kick came without its fd
        framer.next_message()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == []
    assert drain(framer) == [call(1, [9])]


def test_fds_of_a_chunk_go_to_the_message_holding_its_last_byte_not_its_first() -> None:
    """Not something Linux delivers (fds are never returned past their message): pins the rule."""
    framer = Framer(F)
    framer.receive_data(KICK0 + GET_FEATURES, [3])
    with pytest.raises(ProtocolError) as info:  # the kick: no fd
        framer.next_message()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == []
    with pytest.raises(ProtocolError) as info:  # GET_FEATURES: an fd it must not carry
        framer.next_message()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == [3]
    assert framer.next_message() is None
    assert framer.pending_fds() == []


def test_fds_from_several_chunks_ending_in_one_message_add_up() -> None:
    framer = Framer(F)
    framer.receive_data(GET_FEATURES[:4])
    framer.receive_data(GET_FEATURES[4:] + TABLE2[:3], [1])  # ends in the table: for the table
    framer.receive_data(TABLE2[3:30], [2])
    framer.receive_data(TABLE2[30:])
    msgs = drain(framer)
    assert [m.fds for m in msgs] == [[], [1, 2]]
    assert framer.pending_fds() == []


def test_fds_of_a_read_ending_in_the_previous_message_are_not_claimed() -> None:
    framer = Framer(F)
    framer.receive_data(GET_FEATURES + TABLE2[:3])
    framer.receive_data(TABLE2[3:], [1, 2])  # ends on the table's last byte
    framer.receive_data(GET_FEATURES, [3])  # an fd on GET_FEATURES, not on the table
    assert framer.next_message() == FEATURES_MSG
    table = framer.next_message()
    assert table is not None and table.code is F.SET_MEM_TABLE and table.fds == [1, 2]
    with pytest.raises(ProtocolError) as info:
        framer.next_message()
    assert info.value.kind is ErrorKind.BAD_FDS and info.value.fds == [3]


def test_empty_chunk_with_fds_belongs_to_the_next_message() -> None:
    framer = Framer(F)
    assert feed(framer, GET_FEATURES) == [FEATURES_MSG]
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
