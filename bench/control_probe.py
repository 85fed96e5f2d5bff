"""Control-plane answer times while the data path is saturated, and the counters behind a run.

While a benchmark window runs, :class:`ControlProbe` asks vhostd, over and
over from a thread of the benchmark process, what an operator and a new guest
would: ``vhostd status`` (one snapshot from the control socket, what the CLI
reads), ``GET /metrics`` (what Prometheus scrapes), and a new front-end
connection on an idle port (connect, ``GET_FEATURES``, the reply). Each
answer's wall time is kept; the table gives median, 99th percentile and
worst. The data plane and the control plane share one Trio thread today, so
these times are what part 2 of the issue (data-plane threads) must shrink.

:func:`ring_counters` takes two status snapshots (start and end of a window)
and says per second how often each port was kicked, how many TX bursts it
ran and how many frames a burst carried, and how many interrupts it sent or
suppressed: the evidence for a run's regime (see README, "Benchmarks").
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import FrontendRequest
from protocol.encode import encode_request
from vhostd.control import fetch

PAUSE = 0.05
"""Seconds between two rounds of questions: a light operator, not a flood."""
TIMEOUT = 5.0
REPLY = struct.Struct("<IIIQ")
"""GET_FEATURES' reply: request, flags, size, the feature bits."""


@dataclass(slots=True)
class Latencies:
    """Answer times in milliseconds, and questions that got no answer in TIMEOUT."""

    status: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    connect: list[float] = field(default_factory=list)
    failures: int = 0

    def extend(self, other: Latencies) -> None:
        self.status += other.status
        self.metrics += other.metrics
        self.connect += other.connect
        self.failures += other.failures


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _metrics(url: str) -> None:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        r.read()


def _frontend_hello(path: Path) -> None:
    """What a new guest's first exchange is: connect, GET_FEATURES, the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(encode_request(FrontendRequest.GET_FEATURES))
        got = b""
        while len(got) < REPLY.size:
            chunk = sock.recv(REPLY.size - len(got))
            if not chunk:
                raise ConnectionError("vhostd closed the connection before answering")
            got += chunk
        code, _, size, _ = REPLY.unpack(got)
        if code != FrontendRequest.GET_FEATURES or size != 8:
            raise ConnectionError(f"unexpected reply {code}/{size}")


class ControlProbe:
    """Asks the three questions in a loop while ``with`` lasts; answers in ``result``."""

    def __init__(self, control: Path, metrics_url: str, idle_port: Path) -> None:
        self.control = control
        self.metrics_url = metrics_url
        self.idle_port = idle_port
        self.result = Latencies()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-probe", daemon=True)

    def __enter__(self) -> ControlProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT * 4)

    def _run(self) -> None:
        r = self.result
        questions = (
            (r.status, lambda: fetch(str(self.control), TIMEOUT)),
            (r.metrics, lambda: _metrics(self.metrics_url)),
            (r.connect, lambda: _frontend_hello(self.idle_port)),
        )
        while not self._stop.is_set():
            for out, ask in questions:
                try:
                    out.append(_timed(ask))
                except (OSError, ConnectionError, ValueError):
                    r.failures += 1
            self._stop.wait(PAUSE)


def spread(ms: list[float]) -> str:
    """Median / p99 / worst of answer times in milliseconds."""
    if not ms:
        return "-"
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"{statistics.median(ordered):.1f}/{p99:.1f}/{ordered[-1]:.1f}"


@dataclass(slots=True)
class RingRates:
    """Per second over a window, summed over a port's vrings."""

    port: str
    kicks: float
    """On TX rings (the RX rings' are in ``rx_kicks``)."""
    rx_kicks: float
    bursts: float
    frames_per_burst: float
    interrupts: float
    suppressed: float
    backlogged: float
    """RX frames per second that waited in the backlog (the switch's slow path)."""

    def line(self) -> str:
        return (
            f"{self.port}: {self.kicks / 1e3:.1f}k TX kicks/s, "
            f"{self.rx_kicks / 1e3:.1f}k RX kicks/s, {self.bursts / 1e3:.1f}k TX bursts/s "
            f"of {self.frames_per_burst:.1f} frames, {self.interrupts / 1e3:.1f}k interrupts/s, "
            f"{self.suppressed / 1e3:.1f}k suppressed/s, {self.backlogged / 1e3:.1f}k "
            "backlogged/s"
        )


def ring_counters(before: dict[str, Any], after: dict[str, Any], seconds: float) -> list[RingRates]:
    """Per-port rates between two ``vhostd status --json`` snapshots."""
    out = []
    old = {p["name"]: p for p in before["ports"]}
    for port in after["ports"]:
        prev = old.get(port["name"])
        if prev is None:
            continue
        tx, tx0 = port["totals"]["tx"], prev["totals"]["tx"]
        rx, rx0 = port["totals"]["rx"], prev["totals"]["rx"]

        def delta(now: dict[str, int], then: dict[str, int], key: str) -> float:
            return (now[key] - then[key]) / seconds

        bursts = delta(tx, tx0, "bursts")
        out.append(
            RingRates(
                port["name"],
                delta(tx, tx0, "kicks"),
                delta(rx, rx0, "kicks"),
                bursts,
                delta(tx, tx0, "packets") / bursts if bursts else 0.0,
                delta(tx, tx0, "interrupts") + delta(rx, rx0, "interrupts"),
                delta(tx, tx0, "interrupts_suppressed") + delta(rx, rx0, "interrupts_suppressed"),
                delta(rx, rx0, "backlogged"),
            )
        )
    return out
