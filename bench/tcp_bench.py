"""TCP through real QEMU guests: vhostd with offloads on and off, next to DPDK.

Each case moves SIZE random bytes one way over TCP (busybox nc in the guests, md5
checked by the receiver) and reports the sender's throughput (its own clock, from
the connect to the last byte acknowledged) and bytes per packet: the sending
guest's eth0 TX, and the receiving side's RX (the receiving guest's eth0, or the
TAP's own kernel counters, one packet per skb, for the host). Cases:

- guest -> guest through vhostd's switch, offloads on (every port default) and
  off (``[port.features] csum = false, guest_csum = false``);
- the same through DPDK: one testpmd with two net_vhost ports (``tso=1``) in io
  mode;
- guest -> host through a TAP inside a network namespace: vhostd with TAP
  offloads on (IFF_VNET_HDR) and off (ports and TAP), and testpmd with a
  net_vhost port (``tso=1``) and a net_tap port in io mode.

The guests run under TCG on this machine kind and testpmd's forwarding lcore
polls a whole CPU: the numbers compare back-ends within one run, nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon import VhostdProcess
from tests.lab.assets import GuestImage, guest_image
from tests.lab.dpdk import Testpmd, VhostBackend
from tests.lab.netns import Netns, tcp_peer_result
from tests.lab.qemu import Guest, GuestConfig, GuestResult, tcp_pair

BACKEND_LCORES = "0@(0,1),1@0"
HOST = "10.0.0.2"
TAP = "vhdb0"
PORT = 5301
TIMEOUT = 300
TAP_TX_OFFLOADS = ("ipv4_cksum", "tcp_cksum", "tcp_tso")


@dataclass(frozen=True, slots=True)
class TcpCase:
    name: str
    path: str  # "guest" (guest -> guest) or "tap" (guest -> host through a TAP)
    backend: str  # "vhostd" or "dpdk"
    offloads: bool = True


TCP_CASES = (
    TcpCase("guest->guest vhostd offloads on", "guest", "vhostd"),
    TcpCase("guest->guest vhostd offloads off", "guest", "vhostd", offloads=False),
    TcpCase("guest->guest DPDK net_vhost tso=1 io", "guest", "dpdk"),
    TcpCase("guest->TAP vhostd offloads on", "tap", "vhostd"),
    TcpCase("guest->TAP vhostd offloads off", "tap", "vhostd", offloads=False),
    TcpCase("guest->TAP DPDK net_vhost tso=1 + net_tap io", "tap", "dpdk"),
)


@dataclass(slots=True)
class TcpSample:
    mbit_s: float
    tx_bytes_per_packet: float  # the sending guest's eth0
    rx_bytes_per_packet: float  # the receiving guest's eth0, or the TAP's kernel side


@dataclass(slots=True)
class TcpResult:
    case: TcpCase
    samples: list[TcpSample] = field(default_factory=list)


def _per_packet(nbytes: int, packets: int) -> float:
    return nbytes / packets if packets else 0.0


def _vhostd_config(
    workdir: Path, socks: Sequence[Path], offloads: bool, tap: str | None
) -> tuple[Path, Path]:
    control = workdir / "tcp-ctl.sock"
    text = f'control_socket = "{control}"\nlog_level = "warning"\n'
    for sock in socks:
        text += f'[[port]]\nsocket = "{sock}"\n'
        if not offloads:
            text += "[port.features]\ncsum = false\nguest_csum = false\n"
    if tap is not None:
        text += f'[[tap]]\nname = "{tap}"\noffloads = {str(offloads).lower()}\n'
    path = workdir / "tcp-bench.toml"
    path.write_text(text)
    return path, control


@contextmanager
def backend(
    case: TcpCase, workdir: Path, socks: Sequence[Path], netns: Netns | None
) -> Iterator[None]:
    """vhostd or testpmd serving ``socks`` (and a TAP in ``netns`` for TAP cases)."""
    wrapper = tuple(netns.exec_argv([])) if netns is not None else ()
    tap = TAP if case.path == "tap" else None
    if case.backend == "vhostd":
        config, control = _vhostd_config(workdir, socks, case.offloads, tap)
        proc = VhostdProcess(["--config", str(config)], workdir / "vhostd-tcp.log", wrapper=wrapper)
        with proc:
            proc.start(wait_for=[*socks, control])
            yield
        control.unlink(missing_ok=True)
    else:
        ports: list[VhostBackend | str] = [VhostBackend(s, tso=True) for s in socks]
        if tap is not None:
            ports.append(f"net_tap{{index}},iface={tap}")
        pmd = Testpmd(
            ports, workdir, forward_mode="io", lcores=BACKEND_LCORES, name="net_vhost-tcp",
            wrapper=wrapper,
        )  # fmt: skip
        with pmd:
            if tap is not None:
                # net_tap cuts TSO mbufs itself (rte_gso) only with these TX offloads on:
                # without them a guest's super-frame reaches the kernel as one oversized
                # frame. Per port: net_vhost has no TSO TX capability to enable.
                tap_port = len(ports) - 1
                pmd.command_output(f"port stop {tap_port}")
                for offload in TAP_TX_OFFLOADS:
                    pmd.command_output(f"port config {tap_port} tx_offload {offload} on")
                pmd.command_output(f"port start {tap_port}")
            pmd.start_forwarding()
            deadline = time.monotonic() + 30
            while not all(Path(s).exists() for s in socks):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"testpmd made no socket:\n{pmd.output()[-2000:]}")
                time.sleep(0.05)
            yield
    for sock in socks:
        sock.unlink(missing_ok=True)


def _sample(sender: GuestResult, size: int, rx_bytes: int, rx_packets: int) -> TcpSample:
    if not sender.passed or not sender.tcp_elapsed_cs or sender.tcp_elapsed_cs <= 0:
        raise RuntimeError(f"the sending guest failed: {sender}")
    return TcpSample(
        mbit_s=size * 8 / (sender.tcp_elapsed_cs / 100) / 1e6,
        tx_bytes_per_packet=_per_packet(sender.nic["tx_bytes"], sender.nic["tx_packets"]),
        rx_bytes_per_packet=_per_packet(rx_bytes, rx_packets),
    )


def guest_to_guest(case: TcpCase, image: GuestImage, workdir: Path, size: int) -> TcpSample:
    socks = [workdir / "tcp0.sock", workdir / "tcp1.sock"]
    server, client = tcp_pair(socks[0], socks[1], size=size, timeout=TIMEOUT, one_way=True)
    with (
        backend(case, workdir, socks, None),
        Guest(image, server, workdir, "tcp-receiver") as g_rx,
        Guest(image, client, workdir, "tcp-sender") as g_tx,
    ):
        sender = g_tx.result(timeout=TIMEOUT + 60)
        receiver = g_rx.result(timeout=120)
    if not (receiver.passed and receiver.tcp_md5_ok and receiver.tcp_recv == size):
        raise RuntimeError(f"{case.name}: the stream did not arrive intact: {receiver}")
    return _sample(sender, size, receiver.nic["rx_bytes"], receiver.nic["rx_packets"])


def _tap_counters(netns: Netns) -> tuple[int, int]:
    """Bytes and packets the host kernel took in from the TAP (its rx side)."""
    stats = f"/sys/class/net/{TAP}/statistics"
    out = netns.run(["cat", f"{stats}/rx_bytes", f"{stats}/rx_packets"]).stdout.split()
    return int(out[0]), int(out[1])


def _wait_link(netns: Netns, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while netns.run(["ip", "link", "show", TAP], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{TAP} never appeared in {netns.name}")
        time.sleep(0.1)


def guest_to_tap(case: TcpCase, image: GuestImage, workdir: Path, size: int) -> TcpSample:
    sock = workdir / "tcp-tap.sock"
    guest = GuestConfig(
        socket=sock,
        mac="52:54:00:00:00:03",
        role="tcp-client",
        ip="10.0.0.3/24",
        peer=HOST,
        params={"timeout": TIMEOUT, "port": PORT, "count": 3, "size": size, "flow": "send"},
    )
    with ExitStack() as stack:
        netns = stack.enter_context(Netns())
        netns.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        stack.enter_context(backend(case, workdir, [sock], netns))
        _wait_link(netns)
        netns.configure(TAP, f"{HOST}/24")
        listener = netns.tcp_peer(
            "server", HOST, port=PORT, size=size, timeout=TIMEOUT, flow="recv"
        )
        before = _tap_counters(netns)
        with Guest(image, guest, workdir, "tcp-tap-sender") as g:
            sender = g.result(timeout=TIMEOUT + 60)
        after = _tap_counters(netns)
        host = tcp_peer_result(listener, timeout=60)
    if host.get("md5_ok") is not True or host.get("recv") != size:
        raise RuntimeError(f"{case.name}: the stream did not arrive intact: {host}")
    return _sample(sender, size, after[0] - before[0], after[1] - before[1])


def run_tcp_case(case: TcpCase, image: GuestImage, workdir: Path, size: int) -> TcpSample:
    run = guest_to_guest if case.path == "guest" else guest_to_tap
    return run(case, image, workdir, size)


def print_tcp_table(results: Sequence[TcpResult]) -> None:
    head = ("case", "Mbit/s", "sender TX B/pkt", "receiver RX B/pkt")
    rows = [head]
    for r in results:
        s = r.samples
        if not s:
            rows.append((r.case.name, "-", "-", "-"))
            continue
        mbit = sorted(x.mbit_s for x in s)[len(s) // 2]
        tx = sorted(x.tx_bytes_per_packet for x in s)[len(s) // 2]
        rx = sorted(x.rx_bytes_per_packet for x in s)[len(s) // 2]
        rows.append((r.case.name, f"{mbit:.1f}", f"{tx:.0f}", f"{rx:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths))


def report(cases: Sequence[TcpCase], rounds: int, size: int, workdir: Path) -> None:
    """Run ``cases`` ``rounds`` times and print the table (medians of the rounds)."""
    print(f"\n## TCP through QEMU guests ({size >> 20} MiB one way per run)", flush=True)
    image = guest_image()
    results = [TcpResult(c) for c in cases]
    for n in range(rounds):
        for result in results:
            sample = run_tcp_case(result.case, image, workdir, size)
            result.samples.append(sample)
            print(
                f"round {n + 1} {result.case.name}: {sample.mbit_s:.1f} Mbit/s, "
                f"TX {sample.tx_bytes_per_packet:.0f} B/pkt, "
                f"RX {sample.rx_bytes_per_packet:.0f} B/pkt",
                flush=True,
            )
    print()
    print_tcp_table(results)
