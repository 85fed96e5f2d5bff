"""Wire quirks of real QEMU front-ends that the framer must accept."""

from __future__ import annotations

import pytest

from protocol import Framer, FrontendRequest, IotlbMsg, IotlbPerm, IotlbType, ProtocolError


def test_invalidate_with_uninitialised_perm_decodes() -> None:
    """QEMU 7.2 sends INVALIDATE with whatever was on its stack in perm (seen: 178)."""
    header = bytes.fromhex("16000000 09000000 20000000")  # IOTLB_MSG, NEED_REPLY, 32 bytes
    body = (0xFFFEB000).to_bytes(8, "little") + (0x1000).to_bytes(8, "little")
    body += bytes(8) + bytes([178, 3]) + bytes(6)
    framer = Framer(FrontendRequest)
    framer.receive_data(header + body)
    msg = framer.next_message()
    assert msg is not None
    assert msg.payload == IotlbMsg(0xFFFEB000, 0x1000, 0, IotlbPerm.NONE, IotlbType.INVALIDATE)


def test_update_with_bad_perm_is_still_refused() -> None:
    header = bytes.fromhex("16000000 09000000 20000000")
    body = bytes(24) + bytes([178, 2]) + bytes(6)
    framer = Framer(FrontendRequest)
    framer.receive_data(header + body)
    with pytest.raises(ProtocolError, match="perm 178"):
        framer.next_message()
