"""Shared helpers for the protocol tests: feed bytes, collect messages or errors."""

from __future__ import annotations

from collections.abc import Sequence

from protocol import Framer, Message


def h(text: str) -> bytes:
    """Hand-written hex; whitespace is only for readability."""
    return bytes.fromhex(text)


def drain(framer: Framer) -> list[Message]:
    out: list[Message] = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


def feed(framer: Framer, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
    framer.receive_data(data, fds)
    return drain(framer)
