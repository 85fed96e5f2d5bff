"""Looking into the in-process daemon from a test: counters, fds, mappings.

The daemon runs in the test's own process (``tests.daemon.serving``), so
``/proc/self`` is the daemon's: its fd table and its memory map show whether
a connection's fds and guest-memory mappings were really given back.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon import port_config, serving
from tests.vusim.frontend import Frontend
from vhostd import fastpath
from vhostd.daemon import Daemon
from vhostd.port import Port
from vhostd.session import Session


def open_fds() -> int:
    """How many fds this (the daemon's) process holds."""
    return len(os.listdir("/proc/self/fd"))


def memfd_maps() -> int:
    """Mappings of memfds (the simulator's guest RAM as mapped by anyone here)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` until true; fails the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.002)
    del what


def socket_dir() -> str:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    return tempfile.mkdtemp(prefix="vhd-", dir="/tmp")


@asynccontextmanager
async def ports(
    *modes: str, miss_timeout: float = 10.0, **kw: object
) -> AsyncIterator[tuple[Daemon, list[Port]]]:
    """A daemon with one port per mode (named p0, p1, ...).

    ``miss_timeout`` is generous unless a test wants a MISS to time out: on a
    loaded CI machine an answered MISS must never be mistaken for a lost one.
    """
    d = socket_dir()
    configs = [port_config(Path(d) / f"p{i}.sock", mode, **kw) for i, mode in enumerate(modes)]
    try:
        async with serving(*configs) as daemon:
            out = [daemon.ports[f"p{i}"] for i in range(len(modes))]
            for port in out:
                port.miss_timeout = miss_timeout
            yield daemon, out
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def session(port: Port) -> Session:
    assert port.session is not None, f"{port.name}: no front-end connected"
    return port.session


def frame(i: int, size: int = 60, src: int = 2) -> bytes:
    """A unicast frame numbered ``i`` (the number survives reflection).

    RX queue choice hashes the last MAC bytes: with two RX rings an even
    ``dst ^ src`` (dst is 1) lands on the first.
    """
    body = i.to_bytes(4, "big") * (size // 4)
    return b"\x02\x00\x00\x00\x00\x01" + bytes([2, 0, 0, 0, 0, src]) + body[: size - 12]


async def check_port_works(port: Port, n: int = 8, *, iommu: bool = True) -> None:
    """A fresh front-end on ``port`` moves ``n`` frames (the port still serves)."""
    async with Frontend.connect(port.config.socket) as other:
        await other.net_setup(iommu=iommu)
        before = port.stats.totals("tx").packets
        done = await other.send_frames(1, [frame(i) for i in range(n)])
        assert len(done) == n
        assert port.stats.totals("tx").packets == before + n


def count_batches(mp: pytest.MonkeyPatch) -> list[int]:
    """Record how many frames each C ``deliver_batch`` call handles, while ``mp`` lasts,
    and how many the C switch put into (or dropped from) one RX ring in one burst."""
    calls: list[int] = []
    real = fastpath.FastRxQueue.deliver_batch
    real_done = fastpath.FastRxQueue.switch_done

    def spy_done(self: fastpath.FastRxQueue, crx: Any) -> bool:
        vq = self._ring.vq
        took = int(vq.packets + vq.dropped)
        if took:
            calls.append(took)
        return real_done(self, crx)

    mp.setattr(fastpath.FastRxQueue, "switch_done", spy_done)

    def spy(
        self: fastpath.FastRxQueue, burst: fastpath.FrameBurst, *args: Any, **kwargs: Any
    ) -> int:
        done = real(self, burst, *args, **kwargs)
        calls.append(done)
        return done

    mp.setattr(fastpath.FastRxQueue, "deliver_batch", spy)
    return calls


async def reflected(fe: Frontend, rounds: int, start: int = 0) -> None:
    """``rounds`` bursts of 16 numbered frames through a reflect port, back intact and in order."""
    for r in range(rounds):
        sent = [frame(start + 16 * r + i, 60 + 97 * i) for i in range(16)]
        assert len(await fe.send_frames(1, sent)) == 16
        got = await fe.recv_frames(0, count=16, timeout=5)
        assert [g[12:] for g in got] == [f[12:] for f in sent]


def read_all(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` (the kernel's end of a TAP stand-in), in order."""
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out
