"""Guest memory a front-end announces but does not have costs that connection only.

A region larger than its memfd, an ``mmap_offset`` beyond the file's end, an
fd that is not a file: refused at SET_MEM_TABLE / ADD_MEM_REG with a clear
error (failure ack, ``protocol_errors`` count), nothing mapped, while another
front-end on another port moves traffic. A memfd truncated under traffic
(unsealed: QEMU seals its own, the simulator does not): the vhostd process
lives on, the offending connection is closed with a logged reason and
``vhostd_memory_faults_total``, and another front-end keeps moving traffic
throughout. That one runs vhostd as a process: should the guard fail, the
SIGBUS kills the daemon and fails the test, not pytest.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import VhostdProcess
from tests.e2e.vhostd_status import metrics_target
from tests.probe import frame, memfd_maps, open_fds, ports, until
from tests.vusim.frontend import BackendNack, Frontend
from tests.vusim.guestram import PAGE, RamRegion

Bad = Callable[[RamRegion, int], RamRegion]
BAD: dict[str, tuple[Bad, str]] = {
    "larger_than_memfd": (
        lambda r, _: dataclasses.replace(r, size=2 * r.size),
        "does not fit in its file: it needs bytes up to 0x1000000, the file has 0x800000",
    ),
    "offset_beyond_file": (
        lambda r, _: dataclasses.replace(r, size=PAGE, mmap_offset=r.size + PAGE),
        "mmap_offset 0x801000 is beyond the end of its file (0x800000 bytes)",
    ),
    "not_a_file": (
        lambda r, pipe: dataclasses.replace(r, fd=pipe),
        "its fd is a pipe, not a regular file",
    ),
}
KIND = {"set_mem_table": "bad_memory_table", "add_mem_reg": "bad_memory_region"}


@pytest.mark.parametrize("request_name", KIND)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.trio
async def test_memory_the_file_does_not_have_is_refused(
    bad: str, request_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, message = BAD[bad]
    pipe_r, pipe_w = os.pipe()
    try:
        async with (
            ports("switch", "switch") as (_, (p0, p1)),
            Frontend.connect(p1.config.socket) as other,
            Frontend.connect(p0.config.socket) as fe,
        ):
            await other.net_setup()
            assert len(await other.send_frames(1, [frame(i) for i in range(8)])) == 8
            await fe.set_owner()
            await fe.get_features()
            await fe.set_protocol_features(await fe.get_protocol_features())
            fds, maps = open_fds(), memfd_maps()
            region = build(fe.ram.regions[0], pipe_r)
            with pytest.raises(BackendNack):
                if request_name == "set_mem_table":
                    await fe.set_mem_table([region])
                else:
                    await fe.add_mem_reg(region)
            assert p0.stats.protocol_errors == {KIND[request_name]: 1}
            assert (open_fds(), memfd_maps()) == (fds, maps)
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert len(refused) == 1 and message in refused[0], refused
            assert refused[0].startswith(f"p0: {request_name.upper()} refused: region gpa 0x0+")
            # The connection goes on with memory that is there; the other port never stopped.
            await fe.net_setup()
            assert len(await fe.send_frames(1, [frame(i, src=5) for i in range(8)])) == 8
            assert len(await other.send_frames(1, [frame(i) for i in range(8)])) == 8
            assert p0.stats.memory_faults == p1.stats.memory_faults == 0
            assert not p1.stats.protocol_errors
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


# -- a memfd that shrinks under traffic, against vhostd as a process -------------------


def _daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _daemon_memfd_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)


def _counter(target: str, name: str, port: str) -> float:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("port") == port:
                return s.value
    raise KeyError(name)


def test_a_memfd_truncated_under_traffic_closes_only_its_connection(
    tmp_sock_dir: Path, tmp_path: Path
) -> None:
    s0, s1, ctl = (tmp_sock_dir / n for n in ("p0.sock", "p1.sock", "control.sock"))
    args = ["--socket", str(s0), "--socket", str(s1), "--control-socket", str(ctl)]
    proc = VhostdProcess([*args, "--metrics-listen", "127.0.0.1:0"], tmp_path / "vhostd.log")
    with proc.start(wait_for=[s0, s1, ctl]):
        assert proc.proc is not None
        pid = proc.proc.pid
        target = metrics_target(ctl)
        moved: list[float] = []  # when each batch of the other front-end completed

        async def traffic(other: Frontend) -> None:
            i = 0
            while True:
                # Broadcast-free unicast to an unknown MAC: flooded into p0's RX ring too.
                done = await other.send_frames(1, [frame(i + k, src=3) for k in range(16)])
                assert len(done) == 16
                moved.append(time.monotonic())
                i += 16
                await trio.sleep(0.002)

        async def scenario() -> None:
            async with Frontend.connect(str(s1)) as other, trio.open_nursery() as nursery:
                await other.net_setup()
                nursery.start_soon(traffic, other)
                await until(lambda: len(moved) >= 5, 10)
                fds, maps = _daemon_fds(pid), _daemon_memfd_maps(pid)
                async with Frontend.connect(str(s0)) as fe:
                    await fe.net_setup()
                    fe.post_rx(0, 256)
                    rx = fe.vrings[0].ring
                    await until(lambda: rx.used_idx() >= 32, 10)  # the flood reaches p0's guest
                    assert len(await fe.send_frames(1, [frame(i, src=4) for i in range(32)])) == 32
                    for region in fe.ram.regions:
                        os.ftruncate(region.fd, 0)
                    # From here on this process must not touch that RAM (it would fault
                    # here): only kicks, which make vhostd walk both rings at once.
                    fe.kick(0)
                    fe.kick(1)
                    truncated = len(moved)
                    await fe.expect_closed(timeout=10)
                    closed = len(moved)
                # The closed connection left nothing behind in the daemon.
                await until(lambda: (_daemon_fds(pid), _daemon_memfd_maps(pid)) == (fds, maps))
                await until(lambda: len(moved) >= closed + 20, 10)
                nursery.cancel_scope.cancel()
            # The other port never stalled: batches kept completing before, during, after.
            assert len(moved) > closed >= truncated >= 5
            gaps = [b - a for a, b in itertools.pairwise(moved)]
            assert max(gaps) < 2.0, max(gaps)

        trio.run(scenario)
        assert proc.proc.poll() is None, proc.log()
        assert _counter(target, "vhostd_memory_faults_total", "p0") == 1
        assert _counter(target, "vhostd_memory_faults_total", "p1") == 0
        assert _counter(target, "vhostd_disconnections_total", "p0") == 1
        # The region holding the rings faulted first; the other may have too.
        log = proc.log()
        assert re.search(
            r"ERROR vhostd.session: p0: guest memory region gpa 0x0\+0x800000"
            r"(, gpa 0x100000000\+0x800000)? vanished under the back-end \(its memfd shrank; "
            r"front-end is not sealing its memory\): closing the connection\n",
            log,
        ), log
        assert "Traceback" not in log, log
        assert proc.stop() == 0, proc.log()
