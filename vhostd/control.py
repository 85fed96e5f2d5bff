"""The control socket: a JSON snapshot of the daemon for ``vhostd status``.

The daemon listens on a local Unix socket (``control_socket``, default
``/run/vhostd/control.sock``, mode 0600: the snapshot names guests' sockets
and addresses, so only the daemon's user and root may read it). A client
connects and reads until EOF: the daemon writes one JSON document and a
newline, then closes. Nothing is read from the client, so a client cannot
change anything, and ``socat - UNIX-CONNECT:PATH`` works as well as
``vhostd status --json``.

The snapshot is built by :func:`snapshot`, a pure function of the daemon's
state (nothing here mutates a counter or creates a queue entry); the socket
code only serialises it. Every counter counts since the daemon started and
survives front-end reconnects.

JSON keys (``version`` changes only when a key is renamed or removed):

- ``version`` (1), ``pid``, ``uptime_seconds``, ``metrics`` (``"http://HOST:PORT"``
  of the Prometheus endpoint, or null), ``healthy`` (every port listening,
  dialing or connected).
- ``ports``: list, one object per port:

  - ``name``, ``socket``, ``mode`` (switch/reflect/sink/source), ``client`` (bool: vhostd
    dials the front-end), ``state`` (``listening``, ``dialing``, ``connected``,
    ``stopped``), ``connected`` (bool), ``queue_pairs`` (configured), ``mtu``.
  - ``offered_features`` (hex string); ``features`` and ``protocol_features``
    (negotiated, hex strings; ``"0x0"`` when no front-end), ``feature_names`` and
    ``protocol_feature_names`` (lists of names such as ``"VERSION_1"``,
    ``"bit_N"`` for a bit without a name); ``device_status`` (int) and
    ``device_status_names``.
  - ``connections``, ``disconnects``, ``requests``, ``rx_not_ready`` (frames for
    this guest dropped because none of its RX rings was ready).
  - ``protocol_errors`` and ``queue_faults``: ``{kind: count}``.
  - ``vrings``: one object per vring (``2 * queue_pairs``; vring ``2n`` is queue
    pair ``n``'s RX, ``2n+1`` its TX, directions as the guest sees them):
    ``index``, ``queue_pair``, ``direction`` (``rx``/``tx``), ``size``,
    ``started``, ``enabled``, ``failed`` (reason string or null), ``last_avail``
    and ``last_used`` (null unless started), and the counters ``packets``,
    ``bytes``, ``drops``, ``bad_headers``, ``kicks``, ``interrupts``,
    ``interrupts_suppressed``, ``bursts``.
  - ``totals``: ``{"rx": {counters}, "tx": {counters}}``, the sum over vrings.
  - ``iotlb``: ``enabled`` (ACCESS_PLATFORM negotiated now), ``entries``, and
    the counters ``lookups``, ``hits``, ``misses``, ``updates``,
    ``invalidations``, ``evictions``, ``denied``, ``miss_sent`` (MISS messages
    sent to the front-end), ``miss_timeouts``, ``access_failures``,
    ``blocked_accesses``, ``miss_service_count``, ``miss_service_seconds_sum``.

- ``switch``: ``mac_entries``, ``mac_table_size``, ``flooded``, ``forwarded``,
  ``filtered``.
- ``taps``: list of ``name``, ``rx_packets``, ``rx_bytes``, ``tx_packets``,
  ``tx_bytes``, ``tx_dropped`` (rx: kernel to switch; tx: switch to kernel).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from protocol import DeviceStatus, ProtocolFeature, VirtioFeature

from .iotlb import IotlbStats
from .net import QueueStats

if TYPE_CHECKING:
    from .daemon import Daemon
    from .port import Port

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
CLIENT_TIMEOUT = 5.0

QUEUE_COUNTERS: tuple[tuple[str, str], ...] = (
    ("packets", "packets"),
    ("bytes", "bytes"),
    ("drops", "dropped"),
    ("bad_headers", "bad_header"),
    ("kicks", "kicks"),
    ("interrupts", "interrupts"),
    ("interrupts_suppressed", "suppressed"),
    ("bursts", "bursts"),
)
"""(snapshot key, QueueStats attribute)."""

IOTLB_COUNTERS: tuple[str, ...] = tuple(IotlbStats.__slots__)


# -- the snapshot ------------------------------------------------------------


def flag_names(value: int, flags: Iterable[Any]) -> list[str]:
    """Names of the bits set in ``value``, lowest first; unnamed bits as ``bit_N``."""
    named = {int(f): str(f.name) for f in flags if int(f) and int(f) & (int(f) - 1) == 0}
    return [named.get(1 << i, f"bit_{i}") for i in range(value.bit_length()) if value >> i & 1]


def port_state(port: Port) -> str:
    """``connected``, ``listening``, ``dialing`` or ``stopped``."""
    if port.session is not None:
        return "connected"
    if port.config.client:
        return "stopped" if port.cancel_scope.cancel_called else "dialing"
    return "listening" if port.listener is not None else "stopped"


def healthy(daemon: Daemon) -> bool:
    """Serving: every port accepts or dials (or has a front-end)."""
    return all(port_state(p) != "stopped" for p in daemon.ports.values())


def _queue_counters(stats: QueueStats | None) -> dict[str, int]:
    return {key: getattr(stats, attr) if stats else 0 for key, attr in QUEUE_COUNTERS}


def _vrings(port: Port) -> list[dict[str, Any]]:
    session = port.session
    n = 2 * (session.queue_pairs if session is not None else port.config.queue_pairs)
    out = []
    for index in range(n):
        direction = "rx" if index % 2 == 0 else "tx"
        item: dict[str, Any] = {
            "index": index,
            "queue_pair": index // 2,
            "direction": direction,
            "size": 0,
            "started": False,
            "enabled": False,
            "failed": None,
            "last_avail": None,
            "last_used": None,
        }
        if session is not None and index < len(session.vrings):
            vring = session.vrings[index]
            item.update(
                size=vring.size, started=vring.started, enabled=vring.enabled, failed=vring.failed
            )
            q = vring.tx or vring.rx
            if q is not None:
                item.update(last_avail=q.queue.last_avail, last_used=q.queue.last_used)
        item.update(_queue_counters(port.stats.queues.get((index // 2, direction))))
        out.append(item)
    return out


def iotlb_entries(port: Port) -> int:
    """Entries the port's device IOTLB holds now (0 without a front-end)."""
    session = port.session
    if session is None or session.iotlb is None:
        return 0
    return len(session.iotlb)


def _iotlb(port: Port) -> dict[str, Any]:
    stats = port.stats
    session = port.session
    out: dict[str, Any] = {
        "enabled": session is not None and session.mem.iotlb is not None,
        "entries": iotlb_entries(port),
    }
    out.update({name: getattr(stats.iotlb, name) for name in IOTLB_COUNTERS})
    out.update(
        miss_sent=stats.iotlb_miss_sent,
        miss_timeouts=stats.iotlb_miss_timeouts,
        access_failures=stats.access_failures,
        blocked_accesses=stats.blocked_accesses,
        miss_service_count=stats.iotlb_miss_time.count,
        miss_service_seconds_sum=stats.iotlb_miss_time.total,
    )
    return out


def port_snapshot(port: Port) -> dict[str, Any]:
    """One port's entry in the snapshot."""
    session = port.session
    stats = port.stats
    features = session.features if session is not None else 0
    protocol = session.protocol_features if session is not None else 0
    status = session.status if session is not None else 0
    vrings = _vrings(port)
    totals = {
        d: {key: sum(v[key] for v in vrings if v["direction"] == d) for key, _ in QUEUE_COUNTERS}
        for d in ("rx", "tx")
    }
    # Counters of queues beyond the current queue_pairs (a past front-end used
    # more) still belong in the totals.
    shown = {(v["queue_pair"], v["direction"]) for v in vrings}
    for key, qs in stats.queues.items():
        if key not in shown:
            for name, value in _queue_counters(qs).items():
                totals[key[1]][name] += value
    return {
        "name": port.name,
        "socket": port.config.socket,
        "mode": port.config.mode.value,
        "client": port.config.client,
        "state": port_state(port),
        "connected": session is not None,
        "queue_pairs": port.config.queue_pairs,
        "mtu": session.mtu if session is not None else port.config.mtu,
        "offered_features": hex(port.offered_features()),
        "features": hex(features),
        "feature_names": flag_names(features, VirtioFeature),
        "protocol_features": hex(protocol),
        "protocol_feature_names": flag_names(protocol, ProtocolFeature),
        "device_status": status,
        "device_status_names": flag_names(status, DeviceStatus),
        "connections": stats.connections,
        "disconnects": stats.disconnects,
        "requests": stats.requests,
        "rx_not_ready": stats.rx_not_ready,
        "protocol_errors": dict(sorted(stats.protocol_errors.items())),
        "queue_faults": dict(sorted(stats.queue_faults.items())),
        "vrings": vrings,
        "totals": totals,
        "iotlb": _iotlb(port),
    }


def snapshot(daemon: Daemon, now: float | None = None) -> dict[str, Any]:
    """Everything ``vhostd status`` shows, as plain JSON-able data."""
    now = time.monotonic() if now is None else now
    switch = daemon.switch
    return {
        "version": SNAPSHOT_VERSION,
        "pid": os.getpid(),
        "uptime_seconds": round(now - daemon.started_at, 3),
        "metrics": daemon.metrics_url,
        "healthy": healthy(daemon),
        "reload": daemon.reload_status.snapshot(),
        "ports": [port_snapshot(p) for p in daemon.ports.values()],
        "switch": {
            "mac_entries": switch.mac_entries,
            "mac_table_size": switch.table_size,
            "flooded": switch.flooded,
            "forwarded": switch.forwarded,
            "filtered": switch.filtered,
        },
        "taps": [
            {
                "name": t.name,
                "rx_packets": t.rx_packets,
                "rx_bytes": t.rx_bytes,
                "tx_packets": t.tx_packets,
                "tx_bytes": t.tx_bytes,
                "tx_dropped": t.tx_dropped,
            }
            for t in daemon.taps
        ],
    }


# -- the server --------------------------------------------------------------


def _bind(path: str) -> socket.socket:
    """Bind ``path`` mode 0600; a live daemon's socket is never taken over."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its daemon is gone
        else:
            raise OSError(errno.EADDRINUSE, "another vhostd answers there", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


async def serve_control(
    daemon: Daemon,
    path: str,
    *,
    task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on ``path`` with a snapshot, until cancelled.

    A control socket that cannot be created is logged, not fatal: guests'
    networking matters more than ``vhostd status``.
    """
    try:
        raw = _bind(path)
    except OSError as exc:
        log.error("control socket %s: %s; running without it", path, exc)
        task_status.started(None)
        return
    listener = trio.socket.from_stdlib_socket(raw)
    log.info("control socket on %s", path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_answer, daemon, conn)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


async def _answer(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    data = (json.dumps(snapshot(daemon), separators=(",", ":")) + "\n").encode()
    with conn, trio.move_on_after(CLIENT_TIMEOUT):
        try:
            view = memoryview(data)
            while view:
                sent = await conn.send(view)
                view = view[sent:]
        except OSError as exc:
            log.debug("control client went away: %s", exc)


# -- the client (vhostd status) ------------------------------------------------


def fetch(path: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Read one snapshot from the daemon's control socket (blocking)."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def format_status(snap: dict[str, Any]) -> str:
    """The human-readable ``vhostd status`` output."""
    lines = [
        f"vhostd pid {snap['pid']}, up {snap['uptime_seconds']:.0f}s, "
        f"{'healthy' if snap['healthy'] else 'NOT healthy'}"
        + (f", metrics {snap['metrics']}" if snap.get("metrics") else ""),
        "",
    ]
    rows = [["PORT", "STATE", "MODE", "QP", "FEATURES", "STATUS", "CONN", "ERRORS", "SOCKET"]]
    for p in snap["ports"]:
        rows.append(
            [
                p["name"],
                p["state"],
                p["mode"],
                str(p["queue_pairs"]),
                p["features"],
                "|".join(p["device_status_names"]) or "-",
                str(p["connections"]),
                str(sum(p["protocol_errors"].values()) + sum(p["queue_faults"].values())),
                p["socket"],
            ]
        )
    lines += _table(rows)
    for p in snap["ports"]:
        lines += ["", f"port {p['name']}:"]
        if p["connected"]:
            lines.append(f"  features: {' '.join(p['feature_names']) or '-'}")
            lines.append(f"  protocol features: {' '.join(p['protocol_feature_names']) or '-'}")
        vrows = [
            [
                "VRING",
                "DIR",
                "SIZE",
                "STATE",
                "AVAIL",
                "USED",
                "PACKETS",
                "BYTES",
                "DROPS",
                "KICKS",
                "IRQS",
            ]
        ]
        for v in p["vrings"]:
            state = (
                f"failed: {v['failed']}"
                if v["failed"]
                else ("enabled" if v["enabled"] else "disabled")
                if v["started"]
                else "stopped"
            )
            vrows.append(
                [
                    str(v["index"]),
                    v["direction"],
                    str(v["size"]),
                    state,
                    "-" if v["last_avail"] is None else str(v["last_avail"]),
                    "-" if v["last_used"] is None else str(v["last_used"]),
                    str(v["packets"]),
                    str(v["bytes"]),
                    str(v["drops"]),
                    str(v["kicks"]),
                    str(v["interrupts"]),
                ]
            )
        lines += _table(vrows, "  ")
        io = p["iotlb"]
        if io["enabled"] or io["updates"] or io["miss_sent"]:
            lines.append(
                f"  iotlb: {'on' if io['enabled'] else 'off'}, {io['entries']} entries, "
                f"{io['lookups']} lookups, {io['hits']} hits, {io['misses']} misses, "
                f"{io['miss_sent']} MISS sent, {io['updates']} updates, "
                f"{io['invalidations']} invalidations, {io['miss_timeouts']} timeouts, "
                f"{io['access_failures']} access failures"
            )
        problems = {**p["protocol_errors"], **p["queue_faults"]}
        if problems:
            lines.append("  errors: " + ", ".join(f"{k}={n}" for k, n in problems.items()))
    sw = snap["switch"]
    lines += [
        "",
        f"switch: {sw['mac_entries']}/{sw['mac_table_size']} MACs, "
        f"{sw['forwarded']} forwarded, {sw['flooded']} flooded, {sw['filtered']} filtered",
    ]
    for t in snap["taps"]:
        lines.append(
            f"tap {t['name']}: rx {t['rx_packets']} pkts {t['rx_bytes']} B, "
            f"tx {t['tx_packets']} pkts {t['tx_bytes']} B, {t['tx_dropped']} dropped"
        )
    return "\n".join(lines) + "\n"
