"""The in-process daemon against the front-end simulator: frames in, counters out."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.daemon import port_config, serving
from tests.vusim.frontend import Frontend


def test_sink_port_takes_every_frame(tmp_path: Path) -> None:
    sock = Path("/tmp") / f"vhd-smoke-{tmp_path.name[-12:]}.sock"

    async def main() -> None:
        async with serving(port_config(sock, "sink")) as daemon:
            async with Frontend.connect(str(sock)) as fe:
                await fe.net_setup(queue_pairs=1)
                frames = [bytes([i]) * 60 for i in range(200)]
                done = await fe.send_frames(1, frames)
                assert len(done) == 200
            stats = daemon.ports[sock.stem].stats
            tx = stats.totals("tx")
            assert tx.packets == 200
            assert tx.bytes == 200 * 60

    trio.run(main)
