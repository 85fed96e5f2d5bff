"""vhostd.offload: header checks, checksum completion and TCP segmentation, byte for byte."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.enums import VirtioFeature as VF
from tests.offload_frames import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    csum_header,
    gso_header,
    naive_checksum,
    tcp4,
    tcp6,
)
from vhostd.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    MAX_OFFLOAD_FRAME,
    OFFLOAD_FEATURES,
    PLAIN,
    Action,
    BadHeader,
    VnetHeader,
    check_tx,
    checksum,
    complete_checksum,
    for_receiver,
    segment,
)

ALL = int(OFFLOAD_FEATURES)
HOST_ONLY = int(VF.NET_CSUM | VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6)


def test_checksum_matches_the_naive_one() -> None:
    for n in (0, 1, 2, 3, 64, 1501, 65535):
        data = os.urandom(n)
        assert checksum(data) == (naive_checksum(data) or 0xFFFF)
    assert checksum(b"\0\0") == 0xFFFF
    assert checksum(b"\xff\xff") == 0xFFFF  # sum 0xffff: checksum 0, written 0xffff


def test_plain_headers_pass_without_features() -> None:
    frame = tcp4(b"x" * 100)
    assert check_tx(bytes(10), frame, 0) is PLAIN
    # DATA_VALID means nothing on transmit: ignored, not an error.
    assert check_tx(VnetHeader(flags=2).pack(), frame, 0) is PLAIN


def test_checksum_completion_is_byte_exact() -> None:
    payload = os.urandom(999)
    for full, partial, v6 in (
        (tcp4(payload), tcp4(payload, csum="partial"), False),
        (tcp6(payload), tcp6(payload, csum="partial"), True),
    ):
        hdr = check_tx(csum_header(partial, v6), partial, HOST_ONLY)
        assert isinstance(hdr, VnetHeader) and hdr.flags == F_NEEDS_CSUM
        assert complete_checksum(partial, hdr) == full
        out = for_receiver(partial, hdr, 0)
        assert out.action is Action.CSUM_COMPLETED and list(out.frames) == [full]
        assert out.hdr is PLAIN
        same = for_receiver(partial, hdr, int(VF.NET_GUEST_CSUM))
        assert same.action is Action.AS_IS and same.hdr == hdr and same.frames[0] == partial


def _expected_segments(
    payload: bytes, mss: int, seq: int, flags: int, v6: bool, options: bytes = b""
) -> list[bytes]:
    out = []
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)]
    for i, chunk in enumerate(chunks):
        f = flags
        if i < len(chunks) - 1:
            f &= ~(FIN | PSH)
        if i:
            f &= ~CWR
        s = seq + i * mss
        if v6:
            out.append(tcp6(chunk, seq=s, flags=f))
        else:
            out.append(tcp4(chunk, seq=s, flags=f, ip_id=0x1234 + i, options=options))
    return out


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(("size", "mss"), [(1449, 1448), (64000, 1448), (65495, 1460), (3000, 88)])
def test_segmentation_is_byte_exact(v6: bool, size: int, mss: int) -> None:
    payload = os.urandom(size)
    flags = ACK | PSH | FIN | CWR | ECE
    if v6 and size + 20 > 0xFFFF:
        pytest.skip("IPv6 payload length over 64 KiB")
    frame = (tcp6 if v6 else tcp4)(payload, seq=0xFFFFF000, flags=flags, csum="partial")
    hdr = check_tx(gso_header(frame, mss, v6, ecn=True), frame, ALL)
    assert isinstance(hdr, VnetHeader), hdr
    got = segment(frame, hdr)
    want = _expected_segments(payload, mss, 0xFFFFF000, flags, v6)
    assert len(got) == len(want) == -(-size // mss)
    for g, w in zip(got, want, strict=True):
        assert g == w
    # The sequence number wraps: the last segment's is small again.
    if size > 0x1000:
        assert struct.unpack_from("!I", got[-1], 14 + (40 if v6 else 20) + 4)[0] < 0x10000


def test_segmentation_keeps_tcp_options_and_vlan() -> None:
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2)  # NOP NOP timestamps
    payload = os.urandom(5000)
    frame = tcp4(payload, options=options, csum="partial")
    hdr = check_tx(gso_header(frame, 1448), frame, ALL)
    assert isinstance(hdr, VnetHeader)
    assert hdr.hdr_len == 14 + 20 + 32
    assert segment(frame, hdr) == _expected_segments(payload, 1448, 1000, ACK | PSH, False, options)
    tagged = tcp4(payload, vlan=5, csum="partial")
    raw = VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 58, 1448, 38, 16).pack()
    hdr = check_tx(raw, tagged, ALL)
    assert isinstance(hdr, VnetHeader), hdr
    segs = segment(tagged, hdr)
    assert [s[:18] for s in segs] == [tagged[:18]] * 4
    untagged = [s[:12] + s[16:] for s in segs]
    assert untagged == _expected_segments(payload, 1448, 1000, ACK | PSH, False)


def test_per_receiver_choice() -> None:
    frame = tcp4(os.urandom(10000), csum="partial")
    hdr = check_tx(gso_header(frame, 1448), frame, ALL)
    assert isinstance(hdr, VnetHeader)
    whole = for_receiver(frame, hdr, ALL)
    assert whole.action is Action.GSO_WHOLE and whole.hdr == hdr and whole.frames == (frame,)
    for lacking in (VF.NET_GUEST_TSO4, VF.NET_GUEST_CSUM):
        cut = for_receiver(frame, hdr, ALL & ~lacking)
        assert cut.action is Action.SEGMENTED and cut.hdr is PLAIN and len(cut.frames) == 7
    ecn = check_tx(gso_header(frame, 1448, ecn=True), frame, ALL)
    assert isinstance(ecn, VnetHeader)
    assert for_receiver(frame, ecn, ALL & ~VF.NET_GUEST_ECN).action is Action.SEGMENTED
    assert for_receiver(frame, ecn, ALL).action is Action.GSO_WHOLE
    assert for_receiver(frame, PLAIN, 0).frames == (frame,)


def _bad(raw: VnetHeader | bytes, frame: bytes, features: int = ALL) -> object:
    return check_tx(raw.pack() if isinstance(raw, VnetHeader) else raw, frame, features)


def test_hostile_headers_are_refused_with_a_reason() -> None:
    frame = tcp4(os.urandom(4000), csum="partial")
    good = VnetHeader.unpack(gso_header(frame, 1448))
    n = len(frame)
    cases = [
        (good._replace(gso_type=2), ALL, BadHeader.UNKNOWN_GSO_TYPE),
        (good._replace(gso_type=3), ALL, BadHeader.UNKNOWN_GSO_TYPE),
        (good._replace(gso_type=5), ALL, BadHeader.UNKNOWN_GSO_TYPE),
        (good._replace(gso_type=0x7F), ALL, BadHeader.UNKNOWN_GSO_TYPE),
        (good._replace(gso_size=0), ALL, BadHeader.GSO_SIZE_ZERO),
        (good._replace(gso_size=1), ALL, BadHeader.GSO_SIZE_SMALL),
        (good._replace(gso_size=4000), ALL, BadHeader.GSO_NOT_LARGER),
        (good._replace(gso_size=60000), ALL, BadHeader.GSO_NOT_LARGER),
        (good._replace(csum_start=n), ALL, BadHeader.CSUM_OUTSIDE),
        (good._replace(csum_offset=n), ALL, BadHeader.CSUM_OUTSIDE),
        (good._replace(csum_start=0xFFFF, csum_offset=0xFFFF), ALL, BadHeader.CSUM_OUTSIDE),
        (good._replace(csum_start=14), ALL, BadHeader.GSO_HEADERS),
        (good._replace(csum_offset=6), ALL, BadHeader.GSO_HEADERS),
        (good._replace(hdr_len=n + 1), ALL, BadHeader.HDR_LEN),
        (good._replace(gso_type=4), ALL, BadHeader.GSO_HEADERS),  # TCPV6 on an IPv4 frame
        (good._replace(flags=0), ALL, BadHeader.GSO_WITHOUT_CSUM),
        (good._replace(gso_type=0x81), ALL & ~VF.NET_HOST_ECN, BadHeader.ECN_NOT_NEGOTIATED),
        (good, ALL & ~VF.NET_HOST_TSO4, BadHeader.GSO_NOT_NEGOTIATED),
        (good, 0, BadHeader.CSUM_NOT_NEGOTIATED),
        (good._replace(gso_type=0), 0, BadHeader.CSUM_NOT_NEGOTIATED),
    ]
    for hdr, features, why in cases:
        assert _bad(hdr, frame, features) is why, (hdr, why)
    assert _bad(good, frame + bytes(MAX_OFFLOAD_FRAME)) is BadHeader.TOO_BIG
    # The IP length must match the frame (a frame padded or cut short lies).
    assert _bad(good, frame + b"\0") is BadHeader.GSO_HEADERS
    assert _bad(good, frame[:-1]) is BadHeader.GSO_HEADERS
    # A fragment or a non-TCP protocol cannot be segmented as TCP.
    frag = bytearray(frame)
    frag[14 + 6] |= 0x20
    assert _bad(good, bytes(frag)) is BadHeader.GSO_HEADERS
    udp = bytearray(frame)
    udp[14 + 9] = 17
    assert _bad(good, bytes(udp)) is BadHeader.GSO_HEADERS


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=10, max_size=10), frame=st.binary(min_size=14, max_size=3000))
def test_random_headers_never_crash_and_accepted_ones_are_safe(raw: bytes, frame: bytes) -> None:
    hdr = check_tx(raw, frame, ALL)
    if isinstance(hdr, BadHeader):
        return
    for features in (0, ALL):
        out = for_receiver(frame, hdr, features)
        if features == 0:
            assert out.hdr is PLAIN
        for f in out.frames:
            assert 14 <= len(f) <= MAX_OFFLOAD_FRAME


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=20000),
    mss=st.integers(min_value=88, max_value=9000),
    v6=st.booleans(),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN | PSH, ACK | CWR | ECE]),
)
def test_segments_reassemble_to_the_stream(size: int, mss: int, v6: bool, flags: int) -> None:
    payload = os.urandom(size)
    frame = (tcp6 if v6 else tcp4)(payload, flags=flags, csum="partial")
    hdr = check_tx(gso_header(frame, mss, v6), frame, ALL)
    if size <= mss:
        assert hdr is BadHeader.GSO_NOT_LARGER
        return
    assert isinstance(hdr, VnetHeader)
    assert segment(frame, hdr) == _expected_segments(payload, mss, 1000, flags, v6)
