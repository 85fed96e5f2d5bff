"""DPDK testpmd as a peer: virtio-user front-end or the net_vhost reference back-end.

testpmd exits at end of input, so it runs interactively on a pty the runner owns; a
reader thread copies everything it prints into a log file and a buffer that commands
and waits search. Each instance gets its own --file-prefix so several can run at once.
"""

from __future__ import annotations

import itertools
import os
import pty
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.lab.process import log_tail, stop_process

TESTPMD_BINARY = "dpdk-testpmd"
PROMPT = "testpmd> "
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class VirtioUser:
    """A net_virtio_user front-end port (devargs of DPDK 22.11)."""

    path: Path
    queues: int = 1
    mrg_rxbuf: bool = True
    packed_vq: bool = False
    in_order: bool = True
    queue_size: int = 256
    server: bool = False  # virtio-user listens and reconnects after a back-end restart
    mac: str | None = None

    def vdev(self, index: int) -> str:
        args = [
            f"net_virtio_user{index}",
            f"path={self.path}",
            f"queues={self.queues}",
            f"mrg_rxbuf={int(self.mrg_rxbuf)}",
            f"packed_vq={int(self.packed_vq)}",
            f"in_order={int(self.in_order)}",
            f"queue_size={self.queue_size}",
            f"server={int(self.server)}",
        ]
        if self.queues > 1:
            args.append("cq=1")  # multiqueue needs the control queue
        if self.mac:
            args.append(f"mac={self.mac}")
        return ",".join(args)


@dataclass(frozen=True, slots=True)
class VhostBackend:
    """A net_vhost back-end port: the reference vhost-user implementation."""

    iface: Path
    queues: int = 1
    client: bool = False  # False: net_vhost listens on iface
    iommu_support: bool = False
    tso: bool = False  # offer HOST/GUEST TSO and checksum offloads to the guest

    def vdev(self, index: int) -> str:
        return (
            f"net_vhost{index},iface={self.iface},queues={self.queues},"
            f"client={int(self.client)},iommu-support={int(self.iommu_support)},"
            f"tso={int(self.tso)}"
        )


Port = VirtioUser | VhostBackend


@dataclass(frozen=True, slots=True)
class PortStats:
    """One port's counters from `show port stats all`."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parses the last block per port of `show port stats` output."""
    stats: dict[int, PortStats] = {}
    blocks = re.split(r"#+ NIC statistics for port\s+", text)[1:]
    for block in blocks:
        port = int(re.match(r"(\d+)", block).group(1))  # type: ignore[union-attr]

        def num(pattern: str, block: str = block) -> int:
            match = re.search(pattern + r":\s*(\d+)", block)
            return int(match.group(1)) if match else 0

        stats[port] = PortStats(
            port=port,
            rx_packets=num(r"RX-packets"),
            rx_missed=num(r"RX-missed"),
            rx_bytes=num(r"RX-bytes"),
            rx_errors=num(r"RX-errors"),
            tx_packets=num(r"TX-packets"),
            tx_errors=num(r"TX-errors"),
            tx_bytes=num(r"TX-bytes"),
        )
    return stats


class TestpmdError(AssertionError):
    """testpmd failed or did not answer; the message carries its log's tail."""


@dataclass(slots=True)
class Testpmd:
    """One dpdk-testpmd process with the given ports. Use as a context manager.

    `lcores` follows dpdk-peer.md: the main lcore floats, forwarding is pinned, so a
    front-end and a back-end on a 2-core machine pin their forwarding to different CPUs.
    """

    __test__ = False  # not a pytest test class despite the name

    ports: Sequence[Port | str]  # a str is a raw --vdev, e.g. "net_tap{index},iface=vtap0"
    workdir: Path
    forward_mode: str = "io"
    txpkts: int | None = None
    lcores: str = "0@(0,1),1@1"
    memory_mb: int = 1024
    extra_eal: tuple[str, ...] = ()
    extra_app: tuple[str, ...] = ()
    name: str = "testpmd"
    # Prepended to the argv, e.g. Netns.exec_argv([]) so a net_tap port lands in a
    # namespace (`ip netns exec` execs, so the PID stays testpmd's).
    wrapper: tuple[str, ...] = ()
    prefix: str = field(init=False)
    log_path: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _fd: int = field(init=False, default=-1)
    _buf: list[str] = field(init=False, default_factory=list)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _reader: threading.Thread | None = field(init=False, default=None)
    _mark: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.prefix = f"vhd{os.getpid()}x{next(_counter)}"
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        argv = [
            *self.wrapper,
            TESTPMD_BINARY,
            "--lcores", self.lcores,
            "--no-huge", "-m", str(self.memory_mb),
            "--no-shconf", "--no-pci",
            "--file-prefix", self.prefix,
        ]  # fmt: skip
        for index, port in enumerate(self.ports):
            vdev = port.format(index=index) if isinstance(port, str) else port.vdev(index)
            argv += ["--vdev", vdev]
        argv += [*self.extra_eal, "--", "--no-mlockall", f"--forward-mode={self.forward_mode}"]
        if self.txpkts is not None:
            argv.append(f"--txpkts={self.txpkts}")
        nq = max(p.queues for p in self.ports if not isinstance(p, str))
        if nq > 1:
            argv += [f"--rxq={nq}", f"--txq={nq}"]
        argv += [*self.extra_app, "-i"]
        return argv

    def start(self, timeout: float = 30.0) -> Self:
        """Starts testpmd and waits for its first prompt (ports configured)."""
        if shutil.which(TESTPMD_BINARY) is None:
            raise FileNotFoundError(f"{TESTPMD_BINARY} not found (apt-get install dpdk-dev)")
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self._fd = master
        self._reader = threading.Thread(target=self._read, name=self.name, daemon=True)
        self._reader.start()
        self.wait_for(re.escape(PROMPT), timeout)
        return self

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except OSError:  # EIO once testpmd closes the pty
                    return
                if not data:
                    return
                text = _ANSI.sub("", data.decode(errors="replace").replace("\r", ""))
                log.write(text)
                log.flush()
                with self._lock:
                    self._buf.append(text)

    def output(self) -> str:
        with self._lock:
            return "".join(self._buf)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _failure(self, what: str) -> TestpmdError:
        status = "running" if self.running() else f"exited {self.proc and self.proc.returncode}"
        return TestpmdError(f"{self.name}: {what} (testpmd {status})\n{log_tail(self.log_path)}")

    def wait_for(self, pattern: str, timeout: float = 30.0, since: int = 0) -> re.Match[str]:
        """First match of `pattern` in the output after offset `since`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output(), since)
            if match:
                return match
            if not self.running():
                time.sleep(0.2)  # let the reader drain the last lines
                match = regex.search(self.output(), since)
                if match:
                    return match
                raise self._failure(f"exited before {pattern!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {pattern!r} within {timeout:.0f}s")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        """Sends one command line without waiting for the prompt (for commands whose
        output other threads' dumps interleave with, splitting the prompt itself)."""
        os.write(self._fd, line.encode() + b"\n")

    def command_output(self, line: str, timeout: float = 15.0) -> str:
        """Sends one command line and returns what it printed up to the next prompt."""
        since = len(self.output())
        os.write(self._fd, line.encode() + b"\n")
        match = self.wait_for(re.escape(PROMPT), timeout, since)
        return self.output()[since : match.start()]

    def device_failed(self) -> bool:
        return "Failed to start device" in self.output()

    def wait_link_up(self, port: int = 0, timeout: float = 30.0) -> None:
        """Waits for the vhost-user connection to come up (LSC event or port info)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.device_failed():
                raise self._failure("Failed to start device")
            info = self.command_output(f"show port info {port}")
            if re.search(r"Link status:\s*up", info):
                return
            time.sleep(0.2)
        raise self._failure(f"port {port} link not up within {timeout:.0f}s")

    def start_forwarding(self) -> None:
        self.command_output("start")

    def stop_forwarding(self) -> str:
        return self.command_output("stop", timeout=30.0)

    def port_stats(self) -> dict[int, PortStats]:
        return parse_port_stats(self.command_output("show port stats all"))

    def clear_stats(self) -> None:
        self.command_output("clear port stats all")

    def stop(self) -> int | None:
        """`quit` politely (frees the vhost-user socket), then kill by PID; idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.write(self._fd, b"quit\n")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        code = stop_process(self.proc)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._reader is not None:
            self._reader.join(5)
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
