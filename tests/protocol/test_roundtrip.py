"""Hypothesis round trips: encode -> chunking as Linux may deliver it -> Framer gives back equal
messages."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    MAX_MEM_REGIONS,
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
    ProtocolError,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
    encode_reply,
    encode_request,
)
from protocol._rules import Fds, Kind, rule_for

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)
region = st.builds(MemoryRegion, u64, u64, u64, u64)


@st.composite
def config(draw: st.DrawFn) -> ConfigSpace:
    data = draw(st.binary(max_size=256))
    return ConfigSpace(draw(u32), len(data), draw(u32), data)


PAYLOADS: dict[Kind, st.SearchStrategy[Payload]] = {
    Kind.EMPTY: st.none(),
    Kind.OPAQUE: st.none(),
    Kind.U64: u64,
    Kind.VRING_FD: st.builds(VringFd, u8, st.booleans()),
    Kind.VRING_STATE: st.builds(VringState, u32, u32),
    Kind.VRING_ADDR: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    Kind.MEM_TABLE: st.builds(MemoryTable, st.lists(region, max_size=MAX_MEM_REGIONS).map(tuple)),
    Kind.SINGLE_REGION: st.builds(SingleMemoryRegion, region),
    Kind.LOG: st.builds(LogInfo, u64, u64),
    Kind.IOTLB: st.builds(
        IotlbMsg, u64, u64, u64, st.sampled_from(list(IotlbPerm)), st.sampled_from(IotlbType)
    ),
    Kind.CONFIG: config(),
    Kind.INFLIGHT: st.builds(InflightInfo, u64, u64, u16, u16),
    Kind.VRING_AREA: st.builds(VringArea, u8, st.booleans(), u64, u64),
}


def fd_count(rule: Fds, payload: Payload, draw: st.DrawFn) -> int:
    if rule is Fds.NONE:
        return 0
    if rule is Fds.ONE:
        return 1
    if rule is Fds.OPTIONAL:
        return draw(st.integers(0, 1))
    if isinstance(payload, MemoryTable):
        return len(payload.regions)
    assert isinstance(payload, VringFd | VringArea)
    return 0 if payload.no_fd else 1


Wire = tuple[bytes, Message]


@st.composite
def request(draw: st.DrawFn, codes: type[FrontendRequest] | type[BackendRequest]) -> Wire:
    code = draw(st.sampled_from(list(codes)))
    rule = rule_for(code)
    payload = draw(PAYLOADS[rule.request])
    need_reply = draw(st.booleans())
    base = draw(st.integers(0, 10_000))
    fds = [base + i for i in range(fd_count(rule.fds, payload, draw))]
    flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    wire = encode_request(code, payload, need_reply=need_reply)
    return wire, Message(code, flags, payload, fds)


@st.composite
def reply(draw: st.DrawFn, codes: type[FrontendRequest] | type[BackendRequest]) -> Wire:
    code = draw(st.sampled_from(list(codes)))
    rule = rule_for(code)
    payload = draw(PAYLOADS[rule.reply])
    fds = [3] if rule.reply_fds is Fds.ONE else []
    flags = HeaderFlag.VERSION | HeaderFlag.REPLY
    return encode_reply(code, payload), Message(code, flags, payload, fds)


Chunk = tuple[bytes, list[int]]
CUTS = st.lists(st.integers(0, 100_000), max_size=20)


@st.composite
def linux_reads(draw: st.DrawFn, wires: list[Wire]) -> list[Chunk]:
    """Cut the stream into reads the way a Linux unix stream socket may return it.

    Each message is one sendmsg() and its fds ride on its first byte. A read may stop anywhere,
    and may glue any fd-less data, except that the read that returns a message's fds (the one
    holding its first byte) stops at the latest at that message's last byte. Later reads, which
    start inside or after it, may again run on into the following messages.
    """
    stream = b""
    fd_messages: list[tuple[int, int, list[int]]] = []  # (start, end, fds)
    boundaries: list[int] = []
    for data, msg in wires:
        if msg.fds:
            fd_messages.append((len(stream), len(stream) + len(data), msg.fds))
        boundaries.append(len(stream))
        stream += data
    cuts = {0, len(stream), *(c % (len(stream) + 1) for c in draw(CUTS))}
    cuts |= {b for b in boundaries if draw(st.booleans())}  # reads often start on a message
    for start, _, _ in fd_messages:
        if start and draw(st.booleans()):
            cuts.discard(start)  # its read glues data before it (at least the previous tail)
    for start, end, _ in fd_messages:
        cuts.add(start + draw(st.integers(1, end - start)))  # its read stops inside or at the end
    reads: list[Chunk] = []
    assert b"".join(stream[a:b] for a, b in pairwise(sorted(cuts))) == stream
    for a, b in pairwise(sorted(cuts)):
        owners = [(end, fds) for start, end, fds in fd_messages if a <= start < b]
        assert len(owners) <= 1 and all(b <= end for end, _ in owners)  # Linux stopped the read
        reads.append((stream[a:b], owners[0][1] if owners else []))
    return reads


def replay(framer: Framer, reads: list[Chunk]) -> list[Message]:
    """Feed the reads, fds on theirs, draining after each; then end the stream cleanly."""
    out: list[Message] = []
    for data, fds in reads:
        framer.receive_data(data, fds)
        while (msg := framer.next_message()) is not None:
            out.append(msg)
    framer.eof()
    assert framer.pending_fds() == []
    return out


@pytest.mark.parametrize("codes", [FrontendRequest, BackendRequest])
@given(data=st.data())
def test_requests_round_trip(
    codes: type[FrontendRequest] | type[BackendRequest], data: st.DataObject
) -> None:
    wires = data.draw(st.lists(request(codes), min_size=1, max_size=8))
    got = replay(Framer(codes), data.draw(linux_reads(wires)))
    assert got == [msg for _, msg in wires]


@pytest.mark.parametrize("codes", [FrontendRequest, BackendRequest])
@given(data=st.data())
def test_replies_round_trip(
    codes: type[FrontendRequest] | type[BackendRequest], data: st.DataObject
) -> None:
    wires = data.draw(st.lists(reply(codes), min_size=1, max_size=8))
    got = replay(Framer(codes, expect_replies=True), data.draw(linux_reads(wires)))
    assert got == [msg for _, msg in wires]


@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=10))
def test_garbage_never_escapes_as_anything_but_protocol_error(junk: bytes, cuts: list[int]) -> None:
    """Random bytes: every outcome is a Message or a ProtocolError, and no fd is lost."""

    framer = Framer(FrontendRequest, expect_replies=True)
    points = sorted({0, len(junk), *(c % (len(junk) + 1) for c in cuts)})
    given_fds: list[int] = []
    returned: list[int] = []
    for i, (a, b) in enumerate(pairwise(points)):
        framer.receive_data(junk[a:b], [i])
        given_fds.append(i)
        while True:
            try:
                msg = framer.next_message()
            except ProtocolError as exc:
                returned += exc.fds
                if exc.fatal:
                    break
                continue
            if msg is None:
                break
            returned += msg.fds
    try:
        framer.eof()
    except ProtocolError as exc:
        returned += exc.fds
    returned += framer.pending_fds()
    assert sorted(returned) == given_fds
