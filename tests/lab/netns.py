"""Network namespaces the lab creates, uses and always deletes.

Traffic between a guest and the host side of a TAP must not touch the host's own
interfaces, so the TAP (and any host-side peer process) lives in a namespace with a
unique name. Processes started inside are tracked and killed by PID before deletion.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.lab.assets import find_busybox
from tests.lab.process import stop_process

TCP_PEER_SCRIPT = Path(__file__).with_name("tcp_peer.py")
_counter = itertools.count()


class Netns:
    """`with Netns() as ns:` creates `vhd-<pid>-<n>`, deletes it (and its TAPs) on exit."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"vhd-{os.getpid()}-{next(_counter)}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created = False

    def create(self) -> Self:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._created = True
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command inside; failures raise with its stderr in the message."""
        done = subprocess.run(self.exec_argv(argv), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"in netns {self.name}: {' '.join(argv)}: {done.stderr.strip()}")
        return done

    def popen(
        self, argv: Sequence[str], log: Path | None = None, stdout: int | IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts a background process inside; it is killed (by PID) on exit."""
        out: int | IO[bytes] | None = stdout
        if log is not None:
            out = open(log, "wb")  # noqa: SIM115 - owned by the child from here on
        proc = subprocess.Popen(
            self.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
        if log is not None and not isinstance(out, int) and out is not None:
            out.close()
        self._procs.append(proc)
        return proc

    def add_tap(self, dev: str, address: str | None = None, mtu: int | None = None) -> None:
        """A persistent TAP inside the namespace, up, optionally addressed.

        A back-end that opens it must run in the namespace too (`popen`): TAP names
        are looked up in the caller's namespace.
        """
        self.run(["ip", "tuntap", "add", "dev", dev, "mode", "tap"])
        self.configure(dev, address, mtu)

    def add_veth(self, dev: str, peer: str, address: str | None = None) -> None:
        """A veth pair with both ends inside (e.g. a bridge or macvtap experiment)."""
        self.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", peer])
        self.configure(dev, address)
        self.run(["ip", "link", "set", peer, "up"])

    def configure(self, dev: str, address: str | None = None, mtu: int | None = None) -> None:
        if mtu is not None:
            self.run(["ip", "link", "set", dev, "mtu", str(mtu)])
        if address is not None:
            self.run(["ip", "addr", "add", address, "dev", dev])
        self.run(["ip", "link", "set", dev, "up"])

    def ping(self, address: str, count: int = 3, timeout: float = 30.0) -> float:
        """Packet loss in percent of `ping -c count` from inside (100.0 if nothing came back).

        busybox's ping, since the lab needs busybox anyway and iputils-ping may be absent.
        """
        busybox = str(find_busybox())
        done = self.run(
            [busybox, "ping", "-c", str(count), "-i", "0.2", "-W", "2", address],
            check=False,
            timeout=timeout,
        )
        for word in done.stdout.split(","):
            if "packet loss" in word:
                return float(word.strip().split("%")[0])
        return 100.0

    def wait_reachable(self, address: str, timeout: float = 60.0) -> float:
        """Seconds until `address` answers one ping (a guest may still be booting)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.ping(address, count=1) == 0.0:
                return time.monotonic() - start
        raise TimeoutError(f"{address} unreachable from netns {self.name} after {timeout:.0f}s")

    def tcp_peer(
        self,
        mode: str,
        host: str,
        port: int = 5201,
        size: int = 8 << 20,
        timeout: float = 120.0,
        flow: str = "both",
    ) -> subprocess.Popen[bytes]:
        """The host side of the guest tcp roles; read its verdict with `tcp_peer_result`.

        ``flow`` recv / send: only the upload / download stream (see tcp_peer)."""
        argv = [sys.executable, str(TCP_PEER_SCRIPT), mode, host]
        argv += ["--port", str(port), "--size", str(size), "--timeout", str(timeout)]
        argv += ["--flow", flow]
        return self.popen(argv, stdout=subprocess.PIPE)

    def delete(self) -> None:
        """Kills what we started inside, then deletes the namespace (idempotent)."""
        for proc in self._procs:
            stop_process(proc)
        self._procs.clear()
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self._created = False

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


def tcp_peer_result(proc: subprocess.Popen[bytes], timeout: float = 180.0) -> dict[str, object]:
    """The final JSON line a `tcp_peer` process printed."""
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    result: dict[str, object] = json.loads(lines[-1]) if lines else {}
    return result
