"""Why a guest has no network: the warnings of ``vhostd.diagnosis``, driven by the simulator.

The two broken set-ups are what QEMU 7.2 really does (tests/e2e/test_qemu_diagnosis.py
boots one): guest RAM without an fd (plain ``-m``, ``memory-backend-ram``) gives no
memory table at all, and ``share=off`` sends the fd of a mapping the guest then writes
privately, so vhostd sees the file's zeros. The simulator plays both: no memory table,
and a memory table of decoy memfds while the rings live in its own RAM.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from protocol import VirtioFeature
from tests.daemon import port_config, serving
from tests.vusim.frontend import DEFAULT_NET_FEATURES, Frontend
from tests.vusim.guestram import RamRegion
from vhostd import diagnosis
from vhostd.control import format_status, snapshot
from vhostd.daemon import Daemon
from vhostd.metrics import make_registry

WARNED = "vhostd.diagnosis"


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look every 20 ms and report after 0.2 s (3 s in the daemon)."""
    monkeypatch.setattr(diagnosis, "CHECK_SECONDS", 0.02)
    monkeypatch.setattr(diagnosis, "GRACE_SECONDS", 0.2)


@asynccontextmanager
async def one_port(sock: Path, **kw: object) -> AsyncIterator[tuple[Daemon, Frontend]]:
    async with (
        serving(port_config(sock, "switch", **kw), control_socket=f"{sock}.ctl") as d,
        Frontend.connect(str(sock)) as fe,
    ):
        yield d, fe


def codes(d: Daemon) -> list[str]:
    (p,) = snapshot(d)["ports"]
    return [w["code"] for w in p["warnings"]]


async def wait_warning(d: Daemon, code: str, timeout: float = 5.0) -> dict[str, object]:
    with trio.fail_after(timeout):
        while True:
            (p,) = snapshot(d)["ports"]
            for w in p["warnings"]:
                if w["code"] == code:
                    found: dict[str, object] = w
                    return found
            await trio.sleep(0.02)


def qemu_kick(fe: Frontend, q: int) -> None:
    """The count QEMU puts on a fresh host notifier (not a guest kick)."""
    fe.kick(q)


def decoys(fe: Frontend) -> Iterator[RamRegion]:
    """Regions like the guest's, backed by other memfds: what share=off amounts to."""
    for r in fe.ram.regions:
        fd = os.memfd_create("decoy", os.MFD_CLOEXEC)
        os.ftruncate(fd, r.size)
        yield RamRegion(r.gpa, r.size, r.uaddr, fd, 0, mmap.mmap(fd, r.size))


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WARNED and r.levelname == "WARNING"]


def test_kicks_without_a_memory_table(tmp_sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No SET_MEM_TABLE, DRIVER_OK not used: the guest's kicks alone give it away."""
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with one_port(tmp_sock_dir / "vm.sock") as (d, fe):
            fe.set_mem_table = _no_memory_table  # type: ignore[method-assign]
            await fe.net_setup(protocol_features=0)  # no STATUS: DRIVER_OK never comes
            (p,) = snapshot(d)["ports"]
            assert p["protocol_errors"] == {"bad_vring_addr": 2}
            assert p["last_error"]["kind"] == "bad_vring_addr"
            assert "addresses before the memory table" in p["last_error"]["message"]
            qemu_kick(fe, 0)
            await trio.sleep(0.5)  # longer than the grace time: one count is not the guest
            assert codes(d) == []
            fe.kick(0)  # the guest posted RX buffers
            found = await wait_warning(d, "no_memory_table")
            assert "the guest kicks (vring 0: 1)" in str(found["message"])
            assert "share=on" in str(found["message"])
            assert "<access mode='shared'/>" in str(found["message"])
            for _ in range(5):
                fe.kick(0)
                fe.kick(1)
                await trio.sleep(0.05)
            text = format_status(snapshot(d))
            assert "WARNINGS on vm" in text.splitlines()[0]
            assert "WARNING (no_memory_table): " in text
            assert "last error: " in text and "bad_vring_addr: SET_VRING_ADDR refused" in text
            scraped = list(make_registry(d).collect())
            (family,) = [f for f in scraped if f.name == "vhostd_port_warning"]
            assert [(s.labels, s.value) for s in family.samples] == [
                ({"port": "vm", "code": "no_memory_table"}, 1)
            ]
        assert len(warnings_logged(caplog)) == 1, "once per connection, not per kick"

    trio.run(main)


async def _no_memory_table(regions: object = None) -> None:
    """What QEMU does when guest RAM has no fd: sends nothing."""


def test_driver_ok_without_a_memory_table(tmp_sock_dir: Path) -> None:
    """QEMU -m without a shared backend: DRIVER_OK comes, a memory table never does."""

    async def main() -> None:
        async with one_port(tmp_sock_dir / "vm.sock") as (d, fe):
            fe.set_mem_table = _no_memory_table  # type: ignore[method-assign]
            await fe.net_setup()
            found = await wait_warning(d, "no_memory_table")
            assert str(found["message"]).startswith("the front-end set DRIVER_OK, but no memory")
            assert isinstance(found["since"], float)

    trio.run(main)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_private_memory_rings_never_move(
    tmp_sock_dir: Path, caplog: pytest.LogCaptureFixture, packed: bool
) -> None:
    """share=off: the memory table names files the guest does not write; kicks come.

    A packed ring starts at index 0 in wrap 1 (base 0x8000): not a ring that moved."""
    features = DEFAULT_NET_FEATURES | (VirtioFeature.RING_PACKED if packed else 0)
    start = 0x8000 if packed else 0
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with one_port(tmp_sock_dir / "vm.sock") as (d, fe):
            fake = list(decoys(fe))
            real = fe.set_mem_table

            async def private(regions: object = None) -> None:
                await real(fake)

            fe.set_mem_table = private  # type: ignore[method-assign]
            try:
                await fe.net_setup(features=features)
                for q in (0, 1):
                    qemu_kick(fe, q)
                await trio.sleep(0.5)
                assert codes(d) == [], "started rings that were only QEMU-kicked are fine"
                fe.post_rx(0, 16)  # written into RAM vhostd does not see, then kicked
                found = await wait_warning(d, "rings_not_moving")
                assert "the guest kicks (vring 0: 1)" in str(found["message"])
                assert "private copy" in str(found["message"])
                (p,) = snapshot(d)["ports"]
                assert p["connected"] and "DRIVER_OK" in p["device_status_names"]
                assert p["protocol_errors"] == {} and p["queue_faults"] == {}
                assert [v["last_avail"] for v in p["vrings"][:2]] == [start, start]
                assert p["vrings"][0]["kicks"] >= 1
            finally:
                for r in fake:
                    r.mem.close()
                    os.close(r.fd)
        (message,) = warnings_logged(caplog)
        assert message.startswith("vm: the guest kicks (vring 0: 1) but no ring ever moved")

    trio.run(main)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_shared_memory_and_an_idle_guest_are_quiet(tmp_sock_dir: Path, packed: bool) -> None:
    """No warning for a working guest, nor for one whose interface is down (no kicks)."""
    features = DEFAULT_NET_FEATURES | (VirtioFeature.RING_PACKED if packed else 0)

    async def main() -> None:
        async with one_port(tmp_sock_dir / "vm.sock") as (d, fe):
            await fe.net_setup(features=features)
            for q in (0, 1):
                qemu_kick(fe, q)
            await trio.sleep(0.5)
            session = d.ports["vm"].session
            assert session is not None
            assert codes(d) == [] and not session.diagnosis.settled
            # vhostd's own wake-ups (enable, memory table) are not the guest's kicks.
            await fe.set_vring_enable(0, True)
            await fe.set_vring_enable(1, True)
            await trio.sleep(0.5)
            assert codes(d) == []
            assert len(await fe.send_frames(1, [b"\x02" * 60] * 3)) == 3
            with trio.fail_after(5):
                while not session.diagnosis.settled:
                    await trio.sleep(0.02)
            assert codes(d) == []

    trio.run(main)


def test_frames_for_a_guest_without_rx_buffers_are_not_its_kicks(tmp_sock_dir: Path) -> None:
    """Frames waiting for RX buffers wake the RX ring through its kick fd: vhostd's, not
    the guest's (a guest whose interface is down sees the switch's floods)."""

    async def main() -> None:
        async with (
            serving(
                port_config(tmp_sock_dir / "a.sock"),
                port_config(tmp_sock_dir / "b.sock"),
                control_socket=str(tmp_sock_dir / "c.ctl"),
            ) as d,
            Frontend.connect(str(tmp_sock_dir / "a.sock")) as a,
            Frontend.connect(str(tmp_sock_dir / "b.sock")) as b,
        ):
            await a.net_setup()
            await b.net_setup()
            broadcast = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06" + bytes(46)
            for _ in range(20):
                await a.send_frames(1, [broadcast])
            await trio.sleep(0.5)
            session = d.ports["b"].session
            assert session is not None and session.vrings[0].kick_writes > 0
            assert [p["warnings"] for p in snapshot(d)["ports"]] == [[], []]

    trio.run(main)
