"""Prometheus metrics and ``/healthz``, served from the daemon's own trio loop.

The data path counts in plain ints (:mod:`vhostd.stats`); nothing on it calls
prometheus-client. :class:`DaemonCollector` reads those ints when Prometheus
scrapes, and the tiny HTTP server below runs that scrape inside the trio
loop, so no thread ever reads daemon state while the loop changes it.

Endpoints: ``GET /metrics`` (text exposition format 0.0.4), ``GET /healthz``
(200 ``ok`` while every port listens, dials or has a front-end; 503
otherwise). One request per connection (``Connection: close``): Prometheus
opens a connection per scrape interval anyway, and it keeps this server
small.

Labels: ``port`` (the port name), ``queue`` (queue pair index), ``direction``
(``rx``: to the guest, ``tx``: from the guest; for a TAP, ``rx`` is kernel to
switch and ``tx`` switch to kernel), ``kind`` (a stable snake_case reason),
``tap`` (interface name). Every counter counts since the daemon started and
survives front-end reconnects. :data:`METRIC_NAMES` lists every family.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from protocol import VirtioFeature

from . import buildinfo
from .control import flag_names, healthy, iotlb_entries
from .dirtylog import logged_pages
from .offload import OFFLOAD_FEATURES
from .runtime import SetupError
from .stats import Histogram
from .tapoffload import TunOffload

if TYPE_CHECKING:
    from .daemon import Daemon
    from .port import Port

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 32

QUEUE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("vhostd_queue_packets", "packets", "Frames through the queue."),
    ("vhostd_queue_bytes", "bytes", "Frame bytes through the queue (virtio-net header excluded)."),
    ("vhostd_queue_drops", "dropped", "Frames dropped at the queue (ring full, oversize...)."),
    ("vhostd_queue_bad_headers", "bad_header", "TX frames dropped for a bad virtio-net header."),
    ("vhostd_queue_kicks", "kicks", "Notifications (kicks) received from the driver."),
    ("vhostd_queue_interrupts", "interrupts", "Interrupts (call eventfd writes) injected."),
    (
        "vhostd_queue_interrupts_suppressed",
        "suppressed",
        "Interrupts not sent because the driver asked not to be notified.",
    ),
    ("vhostd_queue_bursts", "bursts", "Processing rounds that moved at least one frame."),
    (
        "vhostd_queue_gso_packets",
        "gso_packets",
        "TCP super-frames (GSO): TX taken from the guest; RX handed to it whole.",
    ),
    (
        "vhostd_queue_csum_partial",
        "csum_partial",
        "Frames with the checksum left to the receiver (NEEDS_CSUM), taken or handed whole.",
    ),
    (
        "vhostd_queue_backlogged",
        "backlogged",
        "RX frames that waited in the backlog (no buffer, an IOTLB miss, frames already waiting).",
    ),
)
"""(metric name without _total, QueueStats attribute, help)."""

IOTLB_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("vhostd_iotlb_lookups", "lookups", "Device IOTLB translations attempted."),
    ("vhostd_iotlb_hits", "hits", "Device IOTLB translations found."),
    ("vhostd_iotlb_misses", "misses", "Device IOTLB translations not found."),
    ("vhostd_iotlb_updates", "updates", "IOTLB UPDATE messages applied."),
    ("vhostd_iotlb_invalidations", "invalidations", "IOTLB invalidations and flushes."),
    ("vhostd_iotlb_evictions", "evictions", "IOTLB entries evicted because the table was full."),
    ("vhostd_iotlb_denied", "denied", "Translations refused for lack of permission."),
)
"""(metric name without _total, IotlbStats attribute, help)."""

PORT_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("vhostd_connections", "connections", "Front-end connections accepted or dialed."),
    ("vhostd_disconnections", "disconnects", "Front-end connections ended."),
    ("vhostd_requests", "requests", "vhost-user requests received."),
    (
        "vhostd_rx_not_ready_drops",
        "rx_not_ready",
        "Frames for the guest dropped because none of its RX queues was ready.",
    ),
    (
        "vhostd_memory_faults",
        "memory_faults",
        "Connections closed because guest memory vanished under the back-end (SIGBUS).",
    ),
    (
        "vhostd_log_resizes",
        "log_resizes",
        "Dirty logs replaced by a larger one during a migration (SET_LOG_BASE again).",
    ),
    ("vhostd_iotlb_miss_requests", "iotlb_miss_sent", "IOTLB MISS messages sent to the front-end."),
    (
        "vhostd_iotlb_miss_timeouts",
        "iotlb_miss_timeouts",
        "IOTLB misses the front-end did not answer in time.",
    ),
    (
        "vhostd_iotlb_access_failures",
        "access_failures",
        "Guest accesses that failed translation (reported with ACCESS_FAIL).",
    ),
    (
        "vhostd_iotlb_blocked_accesses",
        "blocked_accesses",
        "Guest accesses blocked by an IOTLB permission.",
    ),
)
"""(metric name without _total, PortStats attribute, help)."""

OFFLOAD_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "vhostd_offload_segmented",
        "segmented",
        "TCP super-frames vhostd cut into segments for this port (it lacks GUEST_TSO).",
    ),
    ("vhostd_offload_segments", "segments", "Frames those software segmentations made."),
    (
        "vhostd_offload_csum_completed",
        "csum_completed",
        "Partial checksums vhostd finished for this port (it lacks GUEST_CSUM).",
    ),
)
"""(metric name without _total, OffloadStats attribute, help)."""

METRIC_NAMES: tuple[str, ...] = (
    "vhostd_build_info",
    "vhostd_port_info",
    "vhostd_port_warning",
    "vhostd_frontend_connected",
    "vhostd_queue_pairs",
    "vhostd_negotiated_features",
    "vhostd_negotiated_protocol_features",
    "vhostd_logging",
    "vhostd_log_pages_total",
    "vhostd_device_status",
    *(f"{name}_total" for name, _, _ in PORT_COUNTERS),
    "vhostd_protocol_errors_total",
    "vhostd_queue_faults_total",
    "vhostd_offload_negotiated",
    *(f"{name}_total" for name, _, _ in OFFLOAD_COUNTERS),
    "vhostd_bad_headers_total",
    "vhostd_vring_running",
    *(f"{name}_total" for name, _, _ in QUEUE_COUNTERS),
    "vhostd_iotlb_enabled",
    "vhostd_iotlb_entries",
    *(f"{name}_total" for name, _, _ in IOTLB_COUNTERS),
    "vhostd_iotlb_miss_service_seconds",
    "vhostd_switch_mac_entries",
    "vhostd_switch_mac_table_capacity",
    "vhostd_switch_forwarded_total",
    "vhostd_switch_flooded_total",
    "vhostd_switch_filtered_total",
    "vhostd_switch_mac_moves_total",
    "vhostd_tap_packets_total",
    "vhostd_tap_bytes_total",
    "vhostd_tap_drops_total",
    "vhostd_tap_gso_frames_total",
    "vhostd_tap_offload_segmented_total",
    "vhostd_tap_offload_segments_total",
    "vhostd_tap_offload_csum_completed_total",
    "vhostd_tap_bad_headers_total",
    "vhostd_tap_offloads",
    "vhostd_up",
    "vhostd_reload_success",
    "vhostd_reload_timestamp_seconds",
)
"""Every vhostd metric family (histograms by base name); process_* come on top."""


def _histogram(
    family: HistogramMetricFamily, labels: list[str], hist: Histogram
) -> HistogramMetricFamily:
    """Add a fixed-bucket :class:`Histogram` with cumulative buckets, +Inf, sum and count."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(hist.bounds, hist.counts, strict=False):
        running += n
        buckets.append((repr(float(bound)), running))
    buckets.append(("+Inf", hist.count))
    family.add_metric(labels, buckets, hist.total)
    return family


class _Counters:
    """One counter family per ``(name, attr, doc)`` row, filled from objects' attributes."""

    def __init__(self, table: tuple[tuple[str, str, str], ...], labels: list[str]) -> None:
        self._families = [
            (CounterMetricFamily(name, doc, labels=labels), attr) for name, attr, doc in table
        ]

    def add(self, values: list[str], source: object | None) -> None:
        """One sample per family: ``source``'s attribute, or 0 when there is no source."""
        for family, attr in self._families:
            family.add_metric(values, getattr(source, attr) if source is not None else 0)

    def __iter__(self) -> Iterator[Metric]:
        return (family for family, _ in self._families)


def _queue_keys(port: Port) -> list[tuple[int, str]]:
    """Every configured queue (zero until used) plus any a front-end used."""
    keys = {(qp, d) for qp in range(port.config.queue_pairs) for d in ("rx", "tx")}
    keys.update(port.stats.queues)
    return sorted(keys)


class DaemonCollector(Collector):
    """Reads the daemon's plain-int counters at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        ports = list(self.daemon.ports.values())
        yield InfoMetricFamily(
            "vhostd_build",
            "This vhostd: package version, Python version, data path (c or python).",
            value={
                "version": buildinfo.version(),
                "python": buildinfo.python_version(),
                "native": buildinfo.native(),
            },
        )
        yield from self._ports(ports)
        yield from self._queues(ports)
        yield from self._iotlb(ports)
        yield from self._switch()
        yield from self._taps()
        yield GaugeMetricFamily(
            "vhostd_up",
            "1 while every port listens, dials or has a front-end (as /healthz).",
            value=1 if healthy(self.daemon) else 0,
        )
        reload = self.daemon.reload_status
        yield GaugeMetricFamily(
            "vhostd_reload_success",
            "0 while the last reload (SIGHUP, vhostd reload) stands refused, else 1.",
            value=1 if reload.success else 0,
        )
        yield GaugeMetricFamily(
            "vhostd_reload_timestamp_seconds",
            "Unix time of the last reload attempt (of start-up before any).",
            value=reload.timestamp,
        )

    def _ports(self, ports: list[Port]) -> Iterator[Metric]:
        info = InfoMetricFamily(
            "vhostd_port", "A configured port.", labels=["port", "socket", "mode"]
        )
        connected = GaugeMetricFamily(
            "vhostd_frontend_connected", "1 while a front-end is connected.", labels=["port"]
        )
        pairs = GaugeMetricFamily(
            "vhostd_queue_pairs", "Queue pairs the port offers.", labels=["port"]
        )
        features = GaugeMetricFamily(
            "vhostd_negotiated_features",
            "Virtio feature bits the front-end set (0 without one).",
            labels=["port"],
        )
        protocol = GaugeMetricFamily(
            "vhostd_negotiated_protocol_features",
            "vhost-user protocol feature bits the front-end set (0 without one).",
            labels=["port"],
        )
        status = GaugeMetricFamily(
            "vhostd_device_status", "Virtio device status byte (SET_STATUS).", labels=["port"]
        )
        counters = _Counters(PORT_COUNTERS, ["port"])
        logging_ = GaugeMetricFamily(
            "vhostd_logging",
            "1 while the port logs every guest write for a live migration (LOG_ALL).",
            labels=["port"],
        )
        log_pages = CounterMetricFamily(
            "vhostd_log_pages",
            "Dirty-log bits vhostd set (pages written while a migration logged them).",
            labels=["port"],
        )
        errors = CounterMetricFamily(
            "vhostd_protocol_errors",
            "Bad or refused vhost-user messages, by kind.",
            labels=["port", "kind"],
        )
        faults = CounterMetricFamily(
            "vhostd_queue_faults", "Rings stopped as broken, by kind.", labels=["port", "kind"]
        )
        offload_counters = _Counters(OFFLOAD_COUNTERS, ["port"])
        offloads = GaugeMetricFamily(
            "vhostd_offload_negotiated",
            "1 for each offload feature the front-end negotiated (CSUM, HOST_TSO4, ...).",
            labels=["port", "feature"],
        )
        bad_headers = CounterMetricFamily(
            "vhostd_bad_headers",
            "TX frames dropped for a refused virtio-net header, by reason.",
            labels=["port", "reason"],
        )
        warnings = GaugeMetricFamily(
            "vhostd_port_warning",
            "1 for each warning on the port's connection (code: no_memory_table, "
            "rings_not_moving: guest memory not shared), as vhostd status shows.",
            labels=["port", "code"],
        )
        for port in ports:
            name = [port.name]
            session = port.session
            info.add_metric(
                name,
                {
                    "port": port.name,
                    "socket": port.config.socket,
                    "mode": port.config.mode.value,
                },
            )
            connected.add_metric(name, 1 if session is not None else 0)
            pairs.add_metric(name, port.config.queue_pairs)
            features.add_metric(name, session.features if session else 0)
            protocol.add_metric(name, session.protocol_features if session else 0)
            status.add_metric(name, session.status if session else 0)
            counters.add(name, port.stats)
            logging_.add_metric(name, 1 if session is not None and session.logging else 0)
            live = session.dirty_log if session is not None else None
            log_pages.add_metric(name, logged_pages(port.stats.log_pages, live))
            for kind, n in sorted(port.stats.protocol_errors.items()):
                errors.add_metric([port.name, kind], n)
            for kind, n in sorted(port.stats.queue_faults.items()):
                faults.add_metric([port.name, kind], n)
            for code in session.diagnosis.findings if session is not None else ():
                warnings.add_metric([port.name, code], 1)
            offload_counters.add(name, port.stats.offload)
            negotiated = session.features & OFFLOAD_FEATURES if session is not None else 0
            for feature in flag_names(negotiated, VirtioFeature):
                offloads.add_metric([port.name, feature], 1)
            reasons: Counter[str] = Counter()
            for qs in port.stats.queues.values():
                reasons.update(qs.bad_headers)
            for reason, n in sorted(reasons.items()):
                bad_headers.add_metric([port.name, reason], n)
        yield from (info, connected, pairs, features, protocol, status, warnings)
        yield from (logging_, log_pages)
        yield from counters
        yield from (errors, faults)
        yield from offload_counters
        yield from (offloads, bad_headers)

    def _queues(self, ports: list[Port]) -> Iterator[Metric]:
        labels = ["port", "queue", "direction"]
        running = GaugeMetricFamily(
            "vhostd_vring_running", "1 while the ring is started and not failed.", labels=labels
        )
        counters = _Counters(QUEUE_COUNTERS, labels)
        for port in ports:
            session = port.session
            for qp, direction in _queue_keys(port):
                values = [port.name, str(qp), direction]
                index = 2 * qp + (direction == "tx")
                vring = (
                    session.vrings[index]
                    if session is not None and index < len(session.vrings)
                    else None
                )
                running.add_metric(values, 1 if vring is not None and vring.running else 0)
                counters.add(values, port.stats.queues.get((qp, direction)))
        yield running
        yield from counters

    def _iotlb(self, ports: list[Port]) -> Iterator[Metric]:
        enabled = GaugeMetricFamily(
            "vhostd_iotlb_enabled",
            "1 while the front-end negotiated ACCESS_PLATFORM (device IOTLB in use).",
            labels=["port"],
        )
        entries = GaugeMetricFamily(
            "vhostd_iotlb_entries", "Entries in the port's device IOTLB.", labels=["port"]
        )
        counters = _Counters(IOTLB_COUNTERS, ["port"])
        service = HistogramMetricFamily(
            "vhostd_iotlb_miss_service_seconds",
            "Time from an IOTLB MISS sent to the UPDATE that answered it.",
            labels=["port"],
        )
        for port in ports:
            name = [port.name]
            session = port.session
            enabled.add_metric(name, 1 if session is not None and session.mem.iotlb else 0)
            entries.add_metric(name, iotlb_entries(port))
            counters.add(name, port.stats.iotlb)
            _histogram(service, name, port.stats.iotlb_miss_time)
        yield from (enabled, entries)
        yield from counters
        yield service

    def _switch(self) -> Iterator[Metric]:
        switch = self.daemon.switch
        yield GaugeMetricFamily(
            "vhostd_switch_mac_entries", "MAC addresses the switch knows.", value=switch.mac_entries
        )
        yield GaugeMetricFamily(
            "vhostd_switch_mac_table_capacity",
            "Most MAC addresses the switch keeps (oldest evicted).",
            value=switch.table_size,
        )
        yield CounterMetricFamily(
            "vhostd_switch_forwarded",
            "Frames sent to the one port that owns the destination MAC.",
            value=switch.forwarded,
        )
        yield CounterMetricFamily(
            "vhostd_switch_flooded",
            "Frames sent to every port (broadcast, multicast, unknown destination).",
            value=switch.flooded,
        )
        yield CounterMetricFamily(
            "vhostd_switch_filtered",
            "Frames dropped because the destination is on the sending port.",
            value=switch.filtered,
        )
        yield CounterMetricFamily(
            "vhostd_switch_mac_moves",
            "MAC addresses that moved to another port at once (a migrated guest).",
            value=switch.moves,
        )

    def _taps(self) -> Iterator[Metric]:
        labels = ["tap", "direction"]
        packets = CounterMetricFamily(
            "vhostd_tap_packets", "Frames through a TAP uplink.", labels=labels
        )
        octets = CounterMetricFamily(
            "vhostd_tap_bytes", "Frame bytes through a TAP uplink.", labels=labels
        )
        drops = CounterMetricFamily(
            "vhostd_tap_drops", "Frames the TAP uplink could not write.", labels=labels
        )
        gso = CounterMetricFamily(
            "vhostd_tap_gso_frames",
            "TCP super-frames read from (rx) or written to (tx) the kernel whole.",
            labels=labels,
        )
        segmented = CounterMetricFamily(
            "vhostd_tap_offload_segmented",
            "Super-frames segmented in software for the kernel (TAP offloads off).",
            labels=["tap"],
        )
        segments = CounterMetricFamily(
            "vhostd_tap_offload_segments",
            "Frames those software segmentations made.",
            labels=["tap"],
        )
        completed = CounterMetricFamily(
            "vhostd_tap_offload_csum_completed",
            "Partial checksums completed in software for the kernel.",
            labels=["tap"],
        )
        bad = CounterMetricFamily(
            "vhostd_tap_bad_headers",
            "Frames from the kernel dropped for their virtio-net header, by reason.",
            labels=["tap", "reason"],
        )
        offloads = GaugeMetricFamily(
            "vhostd_tap_offloads",
            "1 for each offload the kernel may leave to vhostd (TUNSETOFFLOAD: CSUM, TSO4, ...).",
            labels=["tap", "offload"],
        )
        for tap in self.daemon.taps:
            packets.add_metric([tap.name, "rx"], tap.rx_packets)
            packets.add_metric([tap.name, "tx"], tap.tx_packets)
            octets.add_metric([tap.name, "rx"], tap.rx_bytes)
            octets.add_metric([tap.name, "tx"], tap.tx_bytes)
            drops.add_metric([tap.name, "tx"], tap.tx_dropped)
            gso.add_metric([tap.name, "rx"], tap.gso_rx)
            gso.add_metric([tap.name, "tx"], tap.gso_tx)
            segmented.add_metric([tap.name], tap.segmented)
            segments.add_metric([tap.name], tap.segments)
            completed.add_metric([tap.name], tap.csum_completed)
            for reason, n in tap.bad_headers.items():
                bad.add_metric([tap.name, reason.value], n)
            for flag in TunOffload:
                if flag & tap.tun_offload:
                    offloads.add_metric([tap.name, flag.name or ""], 1)
        yield from (packets, octets, drops, gso, segmented, segments, completed, bad, offloads)


def make_registry(daemon: Daemon) -> CollectorRegistry:
    """A registry with the daemon's metrics and the standard process_* ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    ProcessCollector(registry=registry)
    return registry


# -- HTTP ----------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    503: "Service Unavailable",
}


def respond(daemon: Daemon, registry: CollectorRegistry, head: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request head; pure but for the scrape."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, "text/plain; charset=utf-8", b"bad request\n"
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"only GET\n"
    if target == "/metrics":
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(registry)
    if target == "/healthz":
        if healthy(daemon):
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 503, "text/plain; charset=utf-8", b"not serving\n"
    if target == "/":
        return 200, "text/plain; charset=utf-8", b"vhostd: /metrics /healthz\n"
    return 404, "text/plain; charset=utf-8", b"not found\n"


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_metrics(address: tuple[str, int]) -> socket.socket:
    """Bind the metrics listener before anything starts; SetupError (one line) if it cannot be.

    It is only there because it was asked for: a daemon that runs without it
    would look dead to Prometheus and healthy to itself, so the start stops.
    """
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return _bind(host, port)
    except OSError as exc:
        busy = " (another vhostd or exporter there?)" if exc.errno == errno.EADDRINUSE else ""
        raise SetupError(
            f"metrics: cannot listen on {shown}: {exc.strerror or exc}{busy}: "
            "free it or fix [metrics] listen= (--metrics-listen)"
        ) from None


async def serve_metrics(
    daemon: Daemon,
    raw: socket.socket,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /healthz on the bound listener ``raw`` until cancelled.

    Port 0 picks a free port; the bound one is logged ("metrics on
    http://HOST:PORT") and handed to ``task_status``.
    """
    host, port = raw.getsockname()[:2]
    bound = (str(host), int(port))
    registry = make_registry(daemon)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    clients = trio.Semaphore(MAX_CLIENTS)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    log.info("metrics on %s", url)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                clients.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                await _exchange(daemon, registry, stream)
            finally:
                clients.release()

    async with listener, trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, [listener])
        task_status.started(bound)


async def _exchange(daemon: Daemon, registry: CollectorRegistry, stream: trio.SocketStream) -> None:
    head = b""
    code, ctype, body = 408, "text/plain; charset=utf-8", b"timeout\n"
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
                if len(head) > MAX_REQUEST_HEAD:
                    code, ctype, body = 400, "text/plain; charset=utf-8", b"request too large\n"
                    break
            else:
                code, ctype, body = respond(daemon, registry, head)
        reply = (
            f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        if not head.startswith(b"HEAD "):
            reply += body
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics client went away: %s", exc)
