"""A QEMU guest with a vhost-user virtio-net device, optionally behind a vIOMMU.

The guest runs the busybox /init from `tests.lab.guest_init`: it is told what to do on
the kernel command line and reports `VHOSTD-...` markers on the serial console, which
QEMU writes to a file. Tests wait on that file rather than on a pty so a slow TCG guest
never blocks on a full pipe and the whole log survives for failure messages.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.lab.assets import GuestImage
from tests.lab.process import log_tail, stop_process

QEMU_BINARY = "qemu-system-x86_64"


class Iommu(enum.StrEnum):
    """Guest IOTLB flushing: strict unmaps per buffer, lazy batches into flush-alls."""

    STRICT = "strict"
    LAZY = "lazy"


def detect_accel() -> str:
    """'kvm' only where KVM can boot a stock kernel, else 'tcg' (VHOSTD_LAB_ACCEL overrides).

    A PVM-based /dev/kvm (kvm_pvm loaded) opens fine but cannot run an unmodified
    kernel, so the mere presence of /dev/kvm proves nothing; the loaded vendor module
    is a cheap and sufficient signal.
    """
    override = os.environ.get("VHOSTD_LAB_ACCEL")
    if override:
        return override
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    if Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        return "kvm"
    return "tcg"


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """One guest's device wiring and what its /init should do.

    `params` become `vhd.<key>=<value>` on the kernel command line: count, interval,
    size, port, timeout, mtu, quiet (see guest_init for defaults).
    """

    socket: Path
    mac: str = "52:54:00:00:00:02"
    role: str = "idle"
    ip: str = "10.0.0.1/24"
    peer: str = "10.0.0.2"
    params: Mapping[str, str | int] = field(default_factory=dict)
    iommu: Iommu | None = None
    server: bool = False  # QEMU listens (server=on,wait=off); the back-end connects
    reconnect: int | None = None  # client mode: reconnect after N s when the back-end goes
    queues: int = 1
    memory_mb: int = 512
    shared_memory: bool = True  # False: share=off, a guest vhost-user cannot serve
    cpus: int = 1
    accel: str | None = None  # None: detect_accel()
    kernel_args: tuple[str, ...] = ()  # extra kernel command line words
    qmp: Path | None = None  # a QMP server socket (tests.lab.qmp.Qmp connects to it)
    incoming: str | None = None  # a migration destination: "-incoming tcp:127.0.0.1:PORT"
    extra_args: tuple[str, ...] = ()  # e.g. ("-trace", "vhost_user_*", "-D", "trace.log")
    device_args: str = ""  # appended to the virtio-net-pci device, e.g. ",guest_tso4=off"


def tcp_pair(
    server_socket: Path,
    client_socket: Path,
    *,
    size: int,
    timeout: int,
    server_iommu: Iommu | None = None,
    client_iommu: Iommu | None = None,
    one_way: bool = False,
) -> tuple[GuestConfig, GuestConfig]:
    """Two guests on 10.0.0.0/24: a TCP server, and a client that pings it 10 times
    and then moves ``size`` bytes each way (md5-checked); ``timeout`` bounds each /init.

    ``one_way``: only client -> server, so the client's TX and the server's RX counters
    hold data frames alone (the server's TX only ACKs), not both streams mixed."""
    flow_server: dict[str, str | int] = {"flow": "recv", "size": size} if one_way else {}
    flow_client: dict[str, str | int] = {"flow": "send"} if one_way else {}
    server = GuestConfig(
        socket=server_socket,
        mac="52:54:00:00:00:01",
        role="tcp-server",
        ip="10.0.0.1/24",
        peer="10.0.0.2",
        iommu=server_iommu,
        params={"timeout": timeout, **flow_server},
    )
    client = GuestConfig(
        socket=client_socket,
        mac="52:54:00:00:00:02",
        role="tcp-client",
        ip="10.0.0.2/24",
        peer="10.0.0.1",
        iommu=client_iommu,
        params={"timeout": timeout, "count": 10, "size": size, **flow_client},
    )
    return server, client


@dataclass(slots=True)
class GuestResult:
    """The markers a guest printed; None where the guest never got that far."""

    booted: bool = False
    ready: bool = False
    ping_loss: float | None = None
    ping_sent: int | None = None  # role ping-tally: echo requests sent and replies received
    ping_received: int | None = None
    ping_duplicates: int | None = None  # replies that came twice (or stale ones again)
    tcp_sent: int | None = None
    tcp_recv: int | None = None
    tcp_md5_ok: bool | None = None
    tcp_elapsed: int | None = None
    tcp_elapsed_cs: int | None = None  # the same in centiseconds (benchmarks)
    tcp_flow: str | None = None  # both, send or recv (one-way runs; md5_ok None when send)
    dmar_faults: int | None = None
    nic: dict[str, int] = field(default_factory=dict)
    """eth0's statistics after the transfer (tx_bytes, tx_packets, rx_bytes, rx_packets)."""
    features: str = ""
    """The negotiated virtio feature bits as the guest sees them (bit 0 first)."""
    kernel_warnings: int | None = None
    passed: bool | None = None
    reason: str = ""
    errors: list[str] = field(default_factory=list)


def parse_markers(log: str) -> GuestResult:
    """Reads the VHOSTD-* lines of a serial log (later markers win)."""
    result = GuestResult()
    for line in log.splitlines():
        start = line.find("VHOSTD-")
        if start < 0:
            continue
        marker = line[start + len("VHOSTD-") :].strip()
        kind, _, rest = marker.partition(" ")
        kv = dict(re.findall(r"(\w+)=(\S+)", rest))
        if kind == "BOOT":
            result.booted = True
        elif kind == "READY":
            result.ready = True
        elif kind == "PING" and "loss" in kv:
            result.ping_loss = float(kv["loss"])
            if "sent" in kv:
                result.ping_sent = int(kv["sent"])
                result.ping_received = int(kv["received"])
                result.ping_duplicates = int(kv.get("duplicates", "0"))
        elif kind == "KERNEL" and "warnings" in kv:
            result.kernel_warnings = int(kv["warnings"])
        elif kind == "TCP" and "md5_ok" in kv:
            result.tcp_sent = int(kv["sent"])
            result.tcp_recv = int(kv["recv"])
            result.tcp_md5_ok = None if kv["md5_ok"] == "na" else kv["md5_ok"] == "1"
            result.tcp_flow = kv.get("flow", "both")
            result.tcp_elapsed = int(kv.get("elapsed", "-1"))
            result.tcp_elapsed_cs = int(kv.get("elapsed_cs", "-1"))
        elif kind == "NIC":
            result.features = kv.pop("features", "")
            result.nic = {k: int(v) for k, v in kv.items()}
        elif kind == "DMAR" and "faults" in kv:
            result.dmar_faults = int(kv["faults"])
        elif kind == "ERROR":
            result.errors.append(rest)
        elif kind == "RESULT":
            verdict, _, reason = rest.partition(" ")
            result.passed = verdict == "PASS"
            result.reason = reason
    return result


class GuestTimeout(AssertionError):
    """A marker did not appear in time; the message carries the serial log's tail."""


class Guest:
    """One QEMU process. Use as a context manager so it is always stopped.

    >>> with Guest(image, GuestConfig(socket=sock, role="ping"), workdir) as g:
    ...     g.wait_for(r"VHOSTD-RESULT")
    """

    def __init__(self, image: GuestImage, config: GuestConfig, workdir: Path, name: str = "guest"):
        self.image = image
        self.config = config
        self.name = name
        self.serial_log = workdir / f"{name}.serial.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.accel = config.accel or detect_accel()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def kernel_cmdline(self) -> str:
        cfg = self.config
        words = ["console=ttyS0", "panic=-1", "reboot=t"]
        if cfg.iommu is not None:
            strict = "1" if cfg.iommu is Iommu.STRICT else "0"
            words += ["intel_iommu=on", f"iommu.strict={strict}"]
        words += cfg.kernel_args
        params: dict[str, str | int] = {"role": cfg.role, "ip": cfg.ip, "peer": cfg.peer}
        params.update(cfg.params)
        for key, value in params.items():
            if not re.fullmatch(r"[a-z_]+", key) or re.search(r"\s", str(value)):
                raise ValueError(f"bad guest parameter {key}={value!r}")
            words.append(f"vhd.{key}={value}")
        return " ".join(words)

    def command(self) -> list[str]:
        """The full QEMU argv (also handy to paste into a shell when debugging)."""
        cfg = self.config
        kvm = self.accel == "kvm"
        machine = f"q35,accel={self.accel},memory-backend=mem0"
        if kvm:
            machine += ",kernel-irqchip=split"
        chardev = f"socket,id=chr0,path={cfg.socket}"
        if cfg.server:
            chardev += ",server=on,wait=off"
        elif cfg.reconnect is not None:
            chardev += f",reconnect={cfg.reconnect}"
        device = (
            f"virtio-net-pci,netdev=net0,bus=rp1,mac={cfg.mac},disable-legacy=on"
            # TCG: QEMU 7.2 segfaults with MSI-X on a vhost-user device; INTx works.
            f",vectors={2 * cfg.queues + 2 if kvm else 0}"
        )
        if cfg.queues > 1:
            device += ",mq=on"
        if cfg.iommu is not None:
            device += ",iommu_platform=on,ats=on"
        device += cfg.device_args
        argv = [
            QEMU_BINARY,
            "-machine", machine,
            "-cpu", "host" if kvm else "max",
            "-smp", str(cfg.cpus),
            "-m", f"{cfg.memory_mb}M",
            "-object", f"memory-backend-memfd,id=mem0,size={cfg.memory_mb}M,"
            f"share={'on' if cfg.shared_memory else 'off'}",
        ]  # fmt: skip
        if cfg.iommu is not None:
            # Must precede the devices it translates.
            argv += ["-device", "intel-iommu,intremap=on,device-iotlb=on"]
        argv += [
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
            "-chardev", chardev,
            "-netdev", f"vhost-user,id=net0,chardev=chr0,queues={cfg.queues}",
            "-device", device,
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", self.kernel_cmdline(),
            "-display", "none",
            "-serial", f"file:{self.serial_log}",
            "-monitor", "none",
            "-nodefaults",
            "-no-reboot",
        ]  # fmt: skip
        if cfg.qmp is not None:
            argv += ["-qmp", f"unix:{cfg.qmp},server=on,wait=off"]
        if cfg.incoming is not None:
            # Same command line as the source, paused until its migration stream arrives.
            argv += ["-incoming", cfg.incoming]
        argv += cfg.extra_args
        return argv

    def start(self) -> Self:
        if shutil.which(QEMU_BINARY) is None:
            raise FileNotFoundError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")
        self.serial_log.unlink(missing_ok=True)
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _failure(self, what: str) -> GuestTimeout:
        status = "running" if self.running() else f"exited {self.proc and self.proc.returncode}"
        return GuestTimeout(
            f"{self.name}: {what} (QEMU {status}, {time.monotonic() - self.started_at:.1f}s)\n"
            f"--- qemu log ---\n{log_tail(self.qemu_log, 20)}\n"
            f"--- serial log ---\n{log_tail(self.serial_log, 60)}"
        )

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first match of `pattern` in the serial log; fails fast if QEMU is gone."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.serial())
            if match:
                return match
            if not self.running():
                # One last read: QEMU may have flushed the line just before exiting.
                match = regex.search(self.serial())
                if match:
                    return match
                raise self._failure(f"exited before {pattern!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {pattern!r} within {timeout:.0f}s")
            time.sleep(0.1)

    def result(self, timeout: float = 180.0) -> GuestResult:
        """Waits for the RESULT marker and the guest's power-off, then parses the markers."""
        self.wait_for(r"VHOSTD-RESULT", timeout)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        return parse_markers(self.serial())

    def stop(self) -> int | None:
        """Kills this QEMU (by PID) if still running; safe to call twice."""
        if self.proc is None:
            return None
        return stop_process(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
