"""A guest that posts RX buffers too small for any frame stops only its own queue.

Before, RX buffers of length 0 on a port with frames to deliver sent the ring
task into a loop that never awaited: the daemon answered no connection, old
or new. The daemon runs as a child process here, so a daemon that spins
makes these tests fail on their deadlines instead of hanging the test run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.daemon import VhostdProcess
from tests.probe import frame
from tests.vusim.frontend import Frontend
from vhostd.control import fetch

BROADCAST = b"\xff" * 6


def config(tmp: Path, sockets: Path, mode: str) -> tuple[Path, Path]:
    ctl = sockets / "control.sock"
    text = f'control_socket = "{ctl}"\n'
    for name in ("bad", "nb", "ok", "new"):
        text += f'[[port]]\nsocket = "{sockets / name}.sock"\nmode = "{mode}"\n'
    path = tmp / "vhostd.toml"
    path.write_text(text)
    return path, ctl


def port_status(ctl: Path, name: str) -> dict[str, object]:
    for p in fetch(str(ctl))["ports"]:
        if p["name"] == name:
            found: dict[str, object] = p
            return found
    raise KeyError(name)


@pytest.mark.parametrize("size", [0, 4], ids=["len0", "below_header"])
@pytest.mark.parametrize("mode", ["switch", "reflect"])
def test_tiny_rx_buffers_stop_that_queue_and_nothing_else(
    mode: str, size: int, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    cfg, ctl = config(tmp_path, tmp_sock_dir, mode)
    sock = {name: str(tmp_sock_dir / f"{name}.sock") for name in ("bad", "nb", "ok", "new")}
    proc = VhostdProcess(["--config", str(cfg)], tmp_path / "vhostd.log")

    async def main() -> None:
        async with (
            Frontend.connect(sock["bad"]) as bad,
            Frontend.connect(sock["nb"]) as nb,
            Frontend.connect(sock["ok"]) as ok,
        ):
            for fe in (bad, nb, ok):
                await fe.net_setup()
            bad.post_rx(0, 8, buf_size=size)
            ok.post_rx(0, 64)
            # Frames for the bad guest: a neighbour's broadcast, or its own reflections.
            sender = nb if mode == "switch" else bad
            await sender.send_frames(1, [BROADCAST + frame(i, 60)[6:] for i in range(4)])
            start = time.monotonic()
            with trio.fail_after(1.0):
                # A new front-end is answered ...
                async with Frontend.connect(sock["new"]) as new:
                    assert await new.get_features()
                # ... and the second guest's traffic moves.
                mine = [frame(100 + i, 60) for i in range(8)]
                assert len(await ok.send_frames(1, mine)) == 8
                if mode == "reflect":
                    got = await ok.recv_frames(0, count=8, timeout=1.0)
                    assert [g[12:] for g in got] == [f[12:] for f in mine]
            assert time.monotonic() - start < 1.0
            status = await trio.to_thread.run_sync(port_status, ctl, "bad")
            assert status["queue_faults"] == {"rx_buffer_too_small": 1}, status
            rx = status["vrings"][0]  # type: ignore[index]
            assert "cannot hold the 12-byte header" in rx["failed"], rx
            assert status["connected"] is True  # only the queue stopped
            if mode == "switch":
                # The neighbour's broadcasts still reach the good guest.
                assert len(await ok.recv_frames(0, count=4, timeout=1.0)) >= 4

    with proc.start(wait_for=[*sock.values(), ctl]):
        trio.run(main)
        assert proc.proc is not None and proc.proc.poll() is None
        assert "rx_buffer_too_small" in proc.log()
