"""Running vhostd under test: in-process (fast, inspectable) or as a process (real).

``serving(config)`` runs the daemon inside the test's trio loop, so a test can
drive it with the front-end simulator and then read its counters directly.
``VhostdProcess`` runs ``python -m vhostd run ...`` exactly as a user would,
for tests against QEMU and DPDK; it is stopped with SIGTERM, by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import trio

from tests.lab.process import stop_process
from vhostd.config import DaemonConfig, PortConfig, PortMode
from vhostd.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent


def port_config(socket: str | Path, mode: str = "switch", **kw: object) -> PortConfig:
    """A PortConfig named after its socket file, with test-friendly defaults."""
    path = str(socket)
    return PortConfig(name=Path(path).stem, socket=path, mode=PortMode(mode), **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def serving(*ports: PortConfig, **kw: object) -> AsyncIterator[Daemon]:
    """Run a daemon with ``ports`` in this trio loop for the duration of the block."""
    if "control_socket" not in kw:
        # Each test daemon gets its own control socket, never the system's.
        kw["control_socket"] = tempfile.mktemp(prefix="vhd-ctl-", suffix=".sock", dir="/tmp")
    config = DaemonConfig(ports=tuple(ports), **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(Daemon(config).run)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


class VhostdProcess:
    """``vhostd run`` as a child process; use as a context manager."""

    def __init__(self, args: Sequence[str], log_path: Path, *, wrapper: Sequence[str] = ()) -> None:
        self.args = list(args)
        if "--control-socket" not in self.args and "--config" not in self.args:
            ctl = tempfile.mktemp(prefix="vhd-ctl-", suffix=".sock", dir="/tmp")
            self.args += ["--control-socket", ctl]
        self.control_socket = (
            Path(self.args[self.args.index("--control-socket") + 1])
            if "--control-socket" in self.args
            else None
        )
        self.log_path = log_path
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: Sequence[str | Path] = (), timeout: float = 15.0) -> VhostdProcess:
        """Start and wait until every path in ``wait_for`` (its sockets) exists."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "vhostd", "run", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        for path in wait_for:
            while not Path(path).exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vhostd exited early:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vhostd did not create {path}:\n{self.log()}")
                time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        return None if self.proc is None else stop_process(self.proc, timeout)

    def __enter__(self) -> VhostdProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
