"""vhostd vs DPDK net_vhost, driven by DPDK virtio-user: one command, one table.

For each case, each round runs the same DPDK virtio-user load generator first
against ``vhostd run`` and then against DPDK's net_vhost back-end (testpmd), with
the same devargs, packet size and pinning: the front-end's forwarding lcore on
CPU 1, the back-end on CPU 0 (vhostd through ``taskset -c 0``; net_vhost's
forwarding lcore pinned there). Throughput is what the front-end counted over
the window (its TX for sink cases, its RX for reflect and source cases).
vhostd's CPU cost comes from /proc/PID/stat utime+stime over the same window.

Cases: front-end txonly into a sink (vhostd ``--mode sink``, net_vhost rxonly)
at 64 and 1518 bytes; reflect/loopback at 64 bytes (front-end flowgen; vhostd
``--mode reflect``, net_vhost macswap); back-end to front-end at 64 and 1518
bytes (vhostd ``--mode source --source-size N`` generates into the front-end's
RX ring, net_vhost txonly ``--txpkts N``; the front-end runs rxonly and counts
what it receives); mrg_rxbuf on and off; 1 and 2 queue pairs; sink, reflect
and source at 64 and 1518 bytes once more on packed rings (virtio-user
``packed_vq=1`` against both back-ends; a second table puts them beside the
split ones); port to port
through the switch at 64 bytes (one front-end testpmd with two virtio-user
ports A and B on one lcore in ``mac`` mode: a first burst from each, then
whatever one port receives goes out of the other, A's to B's MAC and B's to
A's, through two vhostd ``--mode switch`` ports; counted is what A and B
received; the reference is one testpmd with two net_vhost ports in io mode).
Then idle CPU of each back-end with a connected, silent front-end (and of a vhostd source port
whose front-end is connected but not reading), and the IOTLB cases (translate
cost with 16 vs 65,536 entries; a sink port with the IOTLB on vs off,
in-process with the simulator since virtio-user cannot negotiate
ACCESS_PLATFORM), and the dirty log's cost (logging on vs off, in-process:
virtio-user never starts logging).

Then TCP through real QEMU guests (``bench/tcp_bench.py``): guest to guest and
guest to a TAP, Mbit/s and bytes per packet with vhostd's offloads on and off,
side by side with DPDK net_vhost (``tso=1``) and net_tap in io mode.

In the reflect and switch cases vhostd also runs an idle third port and a
metrics endpoint, and ``bench/control_probe.py`` times the control plane
throughout the window: ``vhostd status``, ``GET /metrics`` and a new
front-end's first answer (GET_FEATURES on the idle port), printed as
median/p99/worst; each round also prints each port's kicks, TX bursts (and
frames per burst) and interrupts per second, from ``vhostd status`` at both
ends of the window.

The load average is printed before and after: on a shared 2-core machine the
numbers mean something only relative to each other within one run.

Run: .venv/bin/python bench/run.py [--quick] [--rounds N] [--seconds S] [--case TEXT]
[--tcp-size MIB] [--no-tcp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import tcp_bench  # noqa: E402
from bench.control_probe import (  # noqa: E402
    ControlProbe,
    Latencies,
    RingRates,
    ring_counters,
    spread,
)
from bench.tcp_bench import TCP_CASES  # noqa: E402
from tests.daemon import VhostdProcess  # noqa: E402
from tests.lab.dpdk import Testpmd, VhostBackend, VirtioUser  # noqa: E402
from vhostd.control import fetch  # noqa: E402

FRONTEND_LCORES = "0@(0,1),1@1"
BACKEND_LCORES = "0@(0,1),1@0"
BACKEND_CPU = "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROBED = ("reflect", "switch")
"""vhostd modes whose windows also time the control plane (``control_probe``)."""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    frontend_mode: str  # testpmd forward mode of the virtio-user load generator
    vhostd_mode: str
    dpdk_mode: str  # testpmd forward mode of the net_vhost reference
    size: int = 64  # frame size: the front-end's txpkts, or the back-end's in source cases
    queues: int = 1
    mrg_rxbuf: bool = True
    counted: str = "tx"  # which front-end counter is the throughput
    packed: bool = False  # the front-end asks for packed rings (virtio-user packed_vq=1)


CASES = (
    Case("txonly 64B -> sink", "txonly", "sink", "rxonly"),
    Case("txonly 1518B -> sink", "txonly", "sink", "rxonly", size=1518),
    Case("txonly 64B -> sink, mrg off", "txonly", "sink", "rxonly", mrg_rxbuf=False),
    Case("txonly 64B -> sink, 2 qp", "txonly", "sink", "rxonly", queues=2),
    Case("reflect 64B (flowgen rx)", "flowgen", "reflect", "macswap", counted="rx"),
    Case("reflect 1518B (flowgen rx)", "flowgen", "reflect", "macswap", size=1518, counted="rx"),
    Case("reflect 64B, mrg off", "flowgen", "reflect", "macswap", mrg_rxbuf=False, counted="rx"),
    Case("reflect 64B, 2 qp", "flowgen", "reflect", "macswap", queues=2, counted="rx"),
    Case("source 64B -> rxonly", "rxonly", "source", "txonly", counted="rx"),
    Case("source 1518B -> rxonly", "rxonly", "source", "txonly", size=1518, counted="rx"),
    Case("source 64B, mrg off", "rxonly", "source", "txonly", mrg_rxbuf=False, counted="rx"),
    Case("source 64B, 2 qp", "rxonly", "source", "txonly", queues=2, counted="rx"),
    Case("switch 64B port <-> port", "mac", "switch", "io", counted="rx"),
)
PACKED_OF = (
    "txonly 64B -> sink",
    "txonly 1518B -> sink",
    "reflect 64B (flowgen rx)",
    "reflect 1518B (flowgen rx)",
    "source 64B -> rxonly",
    "source 1518B -> rxonly",
)
PACKED_CASES = tuple(
    replace(c, name=f"{c.name}, packed", packed=True) for c in CASES if c.name in PACKED_OF
)
"""The same cases on packed rings: both back-ends, the same virtio-user with packed_vq=1."""
ALL_CASES = CASES + PACKED_CASES
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
SWITCH_BURSTS = 7
"""Bursts of 32 each port injects in the switch case: under its 256-entry rings."""
"""The two virtio-user ports of the switch case: A sends to B's MAC and B to A's."""


@dataclass(slots=True)
class Sample:
    mpps: float
    cpu_s_per_mpkt: float | None = None  # the back-end's CPU per million packets
    rates: list[RingRates] = field(default_factory=list)
    """vhostd only: kicks, bursts, interrupts per second of each port over the window."""


@dataclass(slots=True)
class Result:
    case: Case
    vhostd: list[Sample] = field(default_factory=list)
    dpdk: list[Sample] = field(default_factory=list)
    control: Latencies = field(default_factory=Latencies)
    """vhostd's control-plane answer times during the windows (``PROBED`` modes)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Where to ask a running vhostd: control socket, metrics URL, an idle port's socket."""

    control: Path
    metrics_url: str
    idle_port: Path

    @classmethod
    def under(cls, workdir: Path) -> Probe:
        with socket.socket() as s:  # a free loopback port for the metrics endpoint
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return cls(workdir / "ctl.sock", f"http://127.0.0.1:{port}/metrics", workdir / "probe.sock")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


@contextmanager
def vhostd_backend(
    workdir: Path,
    sock: Path,
    mode: str,
    size: int = 64,
    more: Sequence[Path] = (),
    probe: Probe | None = None,
) -> Iterator[int]:
    """vhostd on ``sock`` (and ``more``); with ``probe`` also a metrics endpoint and an
    idle port for ``control_probe`` (the idle port is in ``mode`` too: no frames reach it)."""
    args = ["--socket", str(sock), "--mode", mode, "--control-socket", str(workdir / "ctl.sock")]
    for extra in more:
        args += ["--socket", str(extra)]
    if probe is not None:
        args += ["--socket", str(probe.idle_port)]
        args += ["--metrics-listen", probe.metrics_url.split("/")[2]]
    args += ["--log-level", "warning"]
    if mode == "source":
        args += ["--source-size", str(size)]
    wrapper = ["taskset", "-c", BACKEND_CPU] if shutil.which("taskset") else []
    proc = VhostdProcess(args, workdir / "vhostd.log", wrapper=wrapper)
    with proc:
        proc.start(wait_for=[sock, *more, *([probe.idle_port] if probe else [])])
        assert proc.proc is not None
        yield proc.proc.pid  # taskset execs: the PID is vhostd's


@contextmanager
def dpdk_backend(
    workdir: Path, sock: Path, mode: str, queues: int, size: int = 64, more: Sequence[Path] = ()
) -> Iterator[int]:
    pmd = Testpmd(
        [VhostBackend(s, queues=queues) for s in (sock, *more)],
        workdir,
        forward_mode=mode,
        txpkts=size if mode == "txonly" else None,
        lcores=BACKEND_LCORES,
        name="net_vhost",
    )
    with pmd:
        pmd.start_forwarding()
        assert pmd.proc is not None
        yield pmd.proc.pid


def frontend(workdir: Path, sock: Path, case: Case) -> Testpmd:
    return Testpmd(
        [VirtioUser(sock, queues=case.queues, mrg_rxbuf=case.mrg_rxbuf, packed_vq=case.packed)],
        workdir,
        forward_mode=case.frontend_mode,
        txpkts=case.size,
        lcores=FRONTEND_LCORES,
        name="virtio-user",
    )


@contextmanager
def window(
    probe: Probe | None, latencies: Latencies | None, rates: list[RingRates]
) -> Iterator[None]:
    """A measuring window: with ``probe``, the control plane is asked throughout and the
    ring counters are read at both ends (into ``latencies`` and ``rates``)."""
    if probe is None:
        yield
        return
    before, t0 = fetch(str(probe.control)), time.monotonic()
    with ControlProbe(probe.control, probe.metrics_url, probe.idle_port) as asking:
        yield
    after, t1 = fetch(str(probe.control)), time.monotonic()
    rates += ring_counters(before, after, t1 - t0)
    if latencies is not None:
        latencies.extend(asking.result)


def measure(
    fe: Testpmd,
    backend_pid: int,
    case: Case,
    seconds: float,
    probe: Probe | None = None,
    latencies: Latencies | None = None,
) -> Sample:
    """Forward for a warm-up, then count over ``seconds`` of steady state."""
    fe.wait_link_up()
    fe.start_forwarding()
    time.sleep(min(1.0, seconds / 2))
    fe.clear_stats()
    rates: list[RingRates] = []
    cpu0, t0 = cpu_seconds(backend_pid), time.monotonic()
    with window(probe, latencies, rates):
        time.sleep(seconds)
    stats = fe.port_stats()[0]
    cpu1, t1 = cpu_seconds(backend_pid), time.monotonic()
    fe.stop_forwarding()
    if not fe.running():
        raise RuntimeError(f"testpmd died during {case.name}")
    packets = stats.tx_packets if case.counted == "tx" else stats.rx_packets
    mpkts = packets / 1e6
    return Sample(mpkts / (t1 - t0), (cpu1 - cpu0) / mpkts if mpkts else None, rates)


def switch_frontend(workdir: Path, sock_a: Path, sock_b: Path, case: Case) -> Testpmd:
    """One testpmd, virtio-user ports A and B on one lcore; A sends to MAC_B, B to MAC_A.

    Two testpmd processes (A txonly, B rxonly) on the one front-end CPU
    measure the scheduler instead: whichever is off the CPU for its time
    slice stalls the other's ring, and both back-ends fell to a few hundred
    frames per slice. flowgen would do on one lcore but writes fixed MACs
    that the switch can never learn (everything floods); ``mac`` mode keeps
    the bursts ``tx_first`` injected circulating with the ports' own MACs.
    """
    return Testpmd(
        [
            VirtioUser(s, queues=case.queues, mrg_rxbuf=case.mrg_rxbuf, mac=mac)
            for s, mac in ((sock_a, MAC_A), (sock_b, MAC_B))
        ],
        workdir,
        forward_mode=case.frontend_mode,
        txpkts=case.size,
        lcores=FRONTEND_LCORES,
        extra_app=(f"--eth-peer=0,{MAC_B}", f"--eth-peer=1,{MAC_A}"),
        name="virtio-user",
    )


def measure_switch(
    fe: Testpmd,
    backend_pid: int,
    seconds: float,
    probe: Probe | None = None,
    latencies: Latencies | None = None,
) -> Sample:
    """Both ports' bursts circulate; what both received over ``seconds`` counts."""
    fe.wait_link_up(0)
    fe.wait_link_up(1)
    fe.command_output(f"start tx_first {SWITCH_BURSTS}")
    time.sleep(min(1.0, seconds / 2))
    fe.clear_stats()
    rates: list[RingRates] = []
    cpu0, t0 = cpu_seconds(backend_pid), time.monotonic()
    with window(probe, latencies, rates):
        time.sleep(seconds)
    stats = fe.port_stats()
    cpu1, t1 = cpu_seconds(backend_pid), time.monotonic()
    fe.stop_forwarding()
    if not fe.running():
        raise RuntimeError("testpmd died during the switch case")
    mpkts = (stats[0].rx_packets + stats[1].rx_packets) / 1e6
    return Sample(mpkts / (t1 - t0), (cpu1 - cpu0) / mpkts if mpkts else None, rates)


def run_switch_case(case: Case, workdir: Path, seconds: float, result: Result) -> None:
    a, b = workdir / "a.sock", workdir / "b.sock"
    probe = Probe.under(workdir)
    with (
        vhostd_backend(workdir, a, case.vhostd_mode, more=[b], probe=probe) as pid,
        switch_frontend(workdir, a, b, case) as fe,
    ):
        result.vhostd.append(measure_switch(fe, pid, seconds, probe, result.control))
    probe.idle_port.unlink(missing_ok=True)
    a.unlink(missing_ok=True)
    b.unlink(missing_ok=True)
    with (
        dpdk_backend(workdir, a, case.dpdk_mode, case.queues, more=[b]) as pid,
        switch_frontend(workdir, a, b, case) as fe,
    ):
        result.dpdk.append(measure_switch(fe, pid, seconds))
    a.unlink(missing_ok=True)
    b.unlink(missing_ok=True)


def run_case(case: Case, workdir: Path, seconds: float, result: Result) -> None:
    if case.vhostd_mode == "switch":
        run_switch_case(case, workdir, seconds, result)
        return
    sock = workdir / "bench.sock"
    probe = Probe.under(workdir) if case.vhostd_mode in PROBED else None
    with (
        vhostd_backend(workdir, sock, case.vhostd_mode, case.size, probe=probe) as pid,
        frontend(workdir, sock, case) as fe,
    ):
        result.vhostd.append(measure(fe, pid, case, seconds, probe, result.control))
    sock.unlink(missing_ok=True)
    if probe is not None:
        probe.idle_port.unlink(missing_ok=True)
    with (
        dpdk_backend(workdir, sock, case.dpdk_mode, case.queues, case.size) as pid,
        frontend(workdir, sock, case) as fe,
    ):
        result.dpdk.append(measure(fe, pid, case, seconds))
    sock.unlink(missing_ok=True)


def idle_cpu(workdir: Path, seconds: float) -> tuple[float, float, float]:
    """CPU seconds each back-end burns over ``seconds`` with a connected, silent front-end.

    The third is a vhostd source port whose front-end is connected but not
    forwarding: it filled the RX ring once and must then sleep until a kick.
    """
    case = CASES[0]
    sock = workdir / "idle.sock"
    out = []
    backends: list[Callable[[], object]] = [
        lambda: vhostd_backend(workdir, sock, "sink"),
        lambda: dpdk_backend(workdir, sock, "rxonly", 1),
        lambda: vhostd_backend(workdir, sock, "source"),
    ]
    for make in backends:
        with make() as pid, frontend(workdir, sock, case) as fe:  # type: ignore[attr-defined]
            fe.wait_link_up()
            time.sleep(0.5)
            cpu0 = cpu_seconds(pid)
            time.sleep(seconds)
            out.append(cpu_seconds(pid) - cpu0)
        sock.unlink(missing_ok=True)
    return out[0], out[1], out[2]


def summary(samples: list[float]) -> str:
    if not samples:
        return "-"
    med = statistics.median(samples)
    if len(samples) == 1:
        return f"{med:.3f}"
    return f"{med:.3f} [{min(samples):.3f}-{max(samples):.3f}]"


def print_table(results: list[Result]) -> None:
    head = ("case", "vhostd Mpps", "DPDK Mpps", "ratio", "vhostd CPU s/Mpkt")
    rows = [head]
    for r in results:
        v = [s.mpps for s in r.vhostd]
        d = [s.mpps for s in r.dpdk]
        cpu = [s.cpu_s_per_mpkt for s in r.vhostd if s.cpu_s_per_mpkt is not None]
        ratio = (
            statistics.median(v) / statistics.median(d) if v and d and statistics.median(d) else 0
        )
        rows.append((r.case.name, summary(v), summary(d), f"{ratio:.4f}", summary(cpu)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_packed_table(results: list[Result]) -> None:
    """Packed next to split: each packed case beside the split case it copies."""
    by_name = {r.case.name: r for r in results}
    head = ("case", "vhostd split", "vhostd packed", "DPDK split", "DPDK packed")
    rows = [head]
    for r in results:
        split = by_name.get(r.case.name.removesuffix(", packed"))
        if not r.case.packed or split is None:
            continue
        rows.append(
            (
                split.case.name,
                summary([s.mpps for s in split.vhostd]),
                summary([s.mpps for s in r.vhostd]),
                summary([s.mpps for s in split.dpdk]),
                summary([s.mpps for s in r.dpdk]),
            )
        )
    if len(rows) == 1:
        return
    print("\n## packed vs split rings (Mpps, virtio-user packed_vq=1 against both back-ends)")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_control(results: list[Result]) -> None:
    """vhostd's control-plane answer times while its data path was saturated."""
    rows = [r for r in results if r.control.status]
    if not rows:
        return
    print("\n## Control plane under load (ms: median/p99/worst, asked every 50 ms)")
    for r in rows:
        c = r.control
        print(
            f"{r.case.name}: vhostd status {spread(c.status)}, /metrics {spread(c.metrics)}, "
            f"new front-end GET_FEATURES {spread(c.connect)}"
            + (f", {c.failures} unanswered" if c.failures else ""),
            flush=True,
        )


def iotlb_cases(quick: bool) -> None:
    from bench import iotlb_bench, iotlb_pps

    print("\n## IOTLB", flush=True)
    if quick:
        iotlb_bench.LOOKUPS, iotlb_bench.REPEATS = 20_000, 2
    small = iotlb_bench.time_translate(16)
    hot = iotlb_bench.time_translate(65_536, hot=256)
    spread = iotlb_bench.time_translate(65_536)
    print(
        f"translate: {small:.0f} ns/op with 16 live entries; with 65,536 live entries "
        f"{hot:.0f} ns/op ({hot / small:.2f}x) when lookups go to a ring's 256 pages, "
        f"{spread:.0f} ns/op ({spread / small:.2f}x) when each goes to a random one of all "
        "65,536"
    )
    floor16, floor64k = iotlb_bench.time_dict_floor(16), iotlb_bench.time_dict_floor(65_536)
    print(
        f"floor: a plain dict lookup of a random key costs {floor16:.0f} ns with 16 keys and "
        f"{floor64k:.0f} ns with 65,536 ({floor64k / floor16:.2f}x): memory latency on this machine"
    )
    iotlb_pps.report(pairs=3 if quick else 10, seconds=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, short windows")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="window per run (default 5; quick 1)")
    parser.add_argument("--idle-seconds", type=float, help="idle window (default 10; quick 2)")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help="only the case named TEXT, else cases containing TEXT",
    )
    parser.add_argument("--no-idle", action="store_true", help="skip the idle CPU measurement")
    parser.add_argument("--no-iotlb", action="store_true", help="skip the IOTLB cases")
    parser.add_argument("--no-log", action="store_true", help="skip the dirty-log cases")
    parser.add_argument("--no-tcp", action="store_true", help="skip the QEMU TCP cases")
    parser.add_argument("--tcp-size", type=int, help="MiB moved per TCP run (default 64; quick 8)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    idle_seconds = args.idle_seconds or (2.0 if args.quick else 10.0)
    exact = [c for c in ALL_CASES if c.name in args.case]
    cases = exact or [c for c in ALL_CASES if not args.case or any(t in c.name for t in args.case)]
    tcp_exact = [c for c in TCP_CASES if c.name in args.case]
    tcp_cases = tcp_exact or [
        c for c in TCP_CASES if not args.case or any(t in c.name for t in args.case)
    ]
    if args.no_tcp:
        tcp_cases = []
    if not cases and not tcp_cases:
        parser.error(f"no case matches {args.case}")
    tcp_size = (args.tcp_size or (8 if args.quick else 64)) << 20

    print(f"# vhostd vs DPDK net_vhost ({os.cpu_count()} CPUs), load average {loadavg()}")
    print(f"# {rounds} round(s) x {len(cases)} case(s), {seconds:g} s windows", flush=True)
    results = [Result(c) for c in cases]
    with tempfile.TemporaryDirectory(prefix="vhd-bench-") as tmp:
        workdir = Path(tmp)
        for n in range(rounds):
            for result in results:
                run_case(result.case, workdir, seconds, result)
                v, d = result.vhostd[-1], result.dpdk[-1]
                print(
                    f"round {n + 1} {result.case.name}: vhostd {v.mpps:.3f} Mpps, "
                    f"DPDK {d.mpps:.3f} Mpps (load {loadavg()})",
                    flush=True,
                )
                for rate in v.rates:
                    print(f"    {rate.line()}", flush=True)
        if results:
            print()
            print_table(results)
            print_packed_table(results)
            print_control(results)
        if tcp_cases:
            tcp_bench.report(tcp_cases, rounds, tcp_size, workdir)
        if not args.no_idle:
            vh, dp, src = idle_cpu(workdir, idle_seconds)
            print(
                f"\nidle, front-end connected and silent, {idle_seconds:g} s: "
                f"vhostd {vh:.3f} CPU s ({100 * vh / idle_seconds:.1f}%), "
                f"DPDK net_vhost {dp:.3f} CPU s ({100 * dp / idle_seconds:.1f}%, a poller); "
                f"vhostd source, RX ring full: {src:.3f} CPU s ({100 * src / idle_seconds:.1f}%)"
            )
    if not args.no_iotlb:
        iotlb_cases(args.quick)
    if not args.no_log:
        from bench import dirtylog_bench

        print("\n## Live migration", flush=True)
        dirtylog_bench.report(3 if args.quick else 10, 0.5)
    print(f"\n# load average at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
