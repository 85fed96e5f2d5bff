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
- ``build``: ``version`` (the package's), ``python``, ``native`` (``c`` or
  ``python``: which data path sessions use), as ``vhostd --version`` says.
- ``reload``: the last reload (SIGHUP, ``vhostd reload``): ``count`` (tried since
  start), ``result`` (``"applied"``, ``"refused"``, null before the first), ``time``
  (Unix seconds, null before the first), ``error`` (why it was refused, problems
  joined by ``"; "``, else null), ``changes`` (what an applied one changed, e.g.
  ``"added port vm2"``); see :class:`vhostd.reload.ReloadStatus`.
- ``ports``: list, one object per port:

  - ``name``, ``socket`` (where it listens or dials; for a socket the service manager
    passed, that socket's own path), ``mode`` (switch/reflect/sink/source), ``client``
    (bool: vhostd dials the front-end), ``state`` (``listening``, ``dialing``, ``connected``,
    ``stopped``), ``connected`` (bool), ``queue_pairs`` (configured), ``mtu``.
  - ``offered_features`` (hex string); ``features`` and ``protocol_features``
    (negotiated, hex strings; ``"0x0"`` when no front-end), ``feature_names`` and
    ``protocol_feature_names`` (lists of names such as ``"VERSION_1"``,
    ``"bit_N"`` for a bit without a name); ``device_status`` (int) and
    ``device_status_names``; ``offered_feature_names``.
  - ``mac``: the guest's MAC address (``"52:54:00:12:34:56"``) as SEND_RARP
    announced it, else the one the switch learnt most recently from its frames,
    else null; ``macs``: every MAC the switch has learnt on this port (a guest
    may bridge several), youngest first.
  - ``warnings``: what looks wrong with the connection although nothing failed,
    each ``{"code", "message", "since"}`` (``since``: Unix time); codes
    ``no_memory_table`` and ``rings_not_moving`` (guest memory not shared, see
    :mod:`vhostd.diagnosis`). Empty without a front-end.
  - ``connections``, ``disconnects``, ``requests``, ``rx_not_ready`` (frames for
    this guest dropped because none of its RX rings was ready), ``memory_faults``
    (connections closed because guest memory vanished).
  - ``logging`` (a live migration: LOG_ALL with a dirty log), ``log_pages``
    (dirty-log bits set, all connections), ``log_resizes``.
  - ``protocol_errors`` and ``queue_faults``: ``{kind: count}``.
  - ``last_error``: the newest protocol error, queue fault or memory fault, kept
    across reconnects: ``{"time"`` (Unix time), ``"age_seconds", "kind",
    "message"}``, or null.
  - ``vrings``: one object per vring (``2 * queue_pairs``; vring ``2n`` is queue
    pair ``n``'s RX, ``2n+1`` its TX, directions as the guest sees them):
    ``index``, ``queue_pair``, ``direction`` (``rx``/``tx``), ``size``,
    ``started``, ``enabled``, ``failed`` (reason string or null), ``last_avail``
    and ``last_used`` (null unless started), and the counters ``packets``,
    ``bytes``, ``drops``, ``bad_headers``, ``kicks``, ``interrupts``,
    ``interrupts_suppressed``, ``bursts``, ``gso_packets`` (TCP super-frames:
    TX taken, RX handed whole), ``csum_partial`` (frames with NEEDS_CSUM),
    ``backlogged`` (RX frames that waited in the backlog).
  - ``totals``: ``{"rx": {counters}, "tx": {counters}}``, the sum over vrings.
  - ``iotlb``: ``enabled`` (ACCESS_PLATFORM negotiated now), ``entries``, and
    the counters ``lookups``, ``hits``, ``misses``, ``updates``,
    ``invalidations``, ``evictions``, ``denied``, ``miss_sent`` (MISS messages
    sent to the front-end), ``miss_timeouts``, ``access_failures``,
    ``blocked_accesses``, ``miss_service_count``, ``miss_service_seconds_sum``.
  - ``offload``: ``negotiated`` (offload feature names agreed now),
    ``segmented``/``segments`` (super-frames vhostd cut for this port, and the
    frames made), ``csum_completed`` (checksums it finished for this port),
    ``bad_headers`` (``{reason: count}`` of TX frames dropped for their header).

- ``switch``: ``mac_entries``, ``mac_table_size``, ``flooded``, ``forwarded``, ``mac_moves``,
  ``filtered``.
- ``fdb``: the switch's MAC table (``vhostd fdb``), youngest first: ``mac``,
  ``port`` (a port's or a TAP's name), ``kind`` (``port`` or ``tap``),
  ``age_seconds`` (since a frame from that MAC was last seen there).
- ``taps``: list of ``name``, ``rx_packets``, ``rx_bytes``, ``tx_packets``,
  ``tx_bytes``, ``tx_dropped`` (rx: kernel to switch; tx: switch to kernel),
  ``offloads`` (IFF_VNET_HDR on), ``tun_offload`` (what TUNSETOFFLOAD lets the
  kernel leave undone), ``gso_rx``/``gso_tx`` (super-frames from/to the kernel
  whole), ``segmented``, ``csum_completed`` (finished in software for the
  kernel), ``bad_headers`` (refused headers from the kernel, by reason).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from protocol import DeviceStatus, ProtocolFeature, VirtioFeature

from . import buildinfo
from .dirtylog import logged_pages
from .iotlb import IotlbStats
from .net import QueueStats
from .offload import OFFLOAD_FEATURES
from .runtime import FileId, SetupError, remove_own_socket
from .tapoffload import TunOffload

if TYPE_CHECKING:
    from .daemon import Daemon
    from .port import Port
    from .switch import Endpoint

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
    ("gso_packets", "gso_packets"),
    ("csum_partial", "csum_partial"),
    ("backlogged", "backlogged"),
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


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _last_error(port: Port) -> dict[str, Any] | None:
    err = port.stats.last_error
    if err is None:
        return None
    return {
        "time": round(err.time, 3),
        "age_seconds": round(max(0.0, time.time() - err.time), 3),
        "kind": err.kind,
        "message": err.message,
    }


def port_snapshot(port: Port, learnt: dict[Endpoint, list[str]] | None = None) -> dict[str, Any]:
    """One port's entry in the snapshot; ``learnt``: the switch's MACs by endpoint."""
    session = port.session
    macs = (learnt or {}).get(session, []) if session is not None else []
    rarp = session.rarp_mac if session is not None else None
    findings = session.diagnosis.findings.values() if session is not None else ()
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
        "offered_feature_names": flag_names(port.offered_features(), VirtioFeature),
        "device_status": status,
        "device_status_names": flag_names(status, DeviceStatus),
        "mac": mac_text(rarp) if rarp is not None else (macs[0] if macs else None),
        "macs": macs,
        "warnings": [
            {"code": f.code, "message": f.message, "since": round(f.since, 3)} for f in findings
        ],
        "connections": stats.connections,
        "disconnects": stats.disconnects,
        "requests": stats.requests,
        "rx_not_ready": stats.rx_not_ready,
        "memory_faults": stats.memory_faults,
        "logging": session is not None and session.logging,
        "log_pages": logged_pages(
            stats.log_pages, session.dirty_log if session is not None else None
        ),
        "log_resizes": stats.log_resizes,
        "protocol_errors": dict(sorted(stats.protocol_errors.items())),
        "queue_faults": dict(sorted(stats.queue_faults.items())),
        "last_error": _last_error(port),
        "vrings": vrings,
        "totals": totals,
        "iotlb": _iotlb(port),
        "offload": _offload(port, features),
    }


def _offload(port: Port, features: int) -> dict[str, Any]:
    """Negotiated offloads and what the switch did for this port in software."""
    reasons: Counter[str] = Counter()
    for qs in port.stats.queues.values():
        reasons.update(qs.bad_headers)
    off = port.stats.offload
    return {
        "negotiated": flag_names(features & OFFLOAD_FEATURES, VirtioFeature),
        "segmented": off.segmented,
        "segments": off.segments,
        "csum_completed": off.csum_completed,
        "bad_headers": dict(sorted(reasons.items())),
    }


def snapshot(daemon: Daemon, now: float | None = None) -> dict[str, Any]:
    """Everything ``vhostd status`` shows, as plain JSON-able data."""
    now = time.monotonic() if now is None else now
    switch = daemon.switch
    taps = {id(t) for t in daemon.taps}
    fdb = switch.entries(now)
    learnt: dict[Endpoint, list[str]] = {}
    for mac, endpoint, _ in fdb:
        learnt.setdefault(endpoint, []).append(mac_text(mac))
    return {
        "version": SNAPSHOT_VERSION,
        "build": {
            "version": buildinfo.version(),
            "python": buildinfo.python_version(),
            "native": buildinfo.native(),
        },
        "pid": os.getpid(),
        "uptime_seconds": round(now - daemon.started_at, 3),
        "metrics": daemon.metrics_url,
        "healthy": healthy(daemon),
        "reload": daemon.reload_status.snapshot(),
        "ports": [port_snapshot(p, learnt) for p in daemon.ports.values()],
        "switch": {
            "mac_entries": switch.mac_entries,
            "mac_table_size": switch.table_size,
            "flooded": switch.flooded,
            "mac_moves": switch.moves,
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
                "offloads": t.offloads,
                "tun_offload": [f.name for f in TunOffload if f & t.tun_offload],
                "gso_rx": t.gso_rx,
                "gso_tx": t.gso_tx,
                "segmented": t.segmented,
                "csum_completed": t.csum_completed,
                "bad_headers": {reason.value: n for reason, n in t.bad_headers.items()},
            }
            for t in daemon.taps
        ],
        "fdb": [
            {
                "mac": mac_text(mac),
                "port": endpoint.name,
                "kind": "tap" if id(endpoint) in taps else "port",
                "age_seconds": round(age, 1),
            }
            for mac, endpoint, age in fdb
        ],
    }


# -- the server --------------------------------------------------------------


def _bind(path: str) -> socket.socket:
    """Bind ``path`` mode 0600 (the daemon claimed the path first: claim_socket_path)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
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


@dataclass(slots=True)
class ControlSocket:
    """The bound control socket; it removes its file only while that is still its own."""

    path: str
    sock: socket.socket
    created: FileId

    def close(self) -> None:
        self.sock.close()
        remove_own_socket(self.path, self.created)


def bind_control(path: str) -> ControlSocket:
    """Bind the control socket before anything starts; SetupError (one line) if it cannot be.

    A daemon nobody can ask (``vhostd status``, ``vhostd reload``) must not run
    as if all was well, so this stops the start like a port that cannot listen.
    """
    try:
        sock = _bind(path)
        return ControlSocket(path, sock, FileId.of(path))
    except OSError as exc:
        raise SetupError(
            f"control socket {path}: cannot listen: {exc.strerror or exc}: "
            "fix control_socket= (--control-socket) or the directory's permissions"
        ) from None


async def serve_control(
    daemon: Daemon,
    control: ControlSocket,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on the bound control socket with a snapshot, until cancelled;
    the socket is closed and its file removed on the way out."""
    try:
        listener = trio.socket.from_stdlib_socket(control.sock)
        log.info("control socket on %s", control.path)
        async with trio.open_nursery() as nursery:
            task_status.started(control.path)
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_answer, daemon, conn)
    finally:
        control.close()


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


def _errors(p: dict[str, Any]) -> int:
    counts = [*p["protocol_errors"].values(), *p["queue_faults"].values()]
    return sum(int(n) for n in counts) + int(p.get("memory_faults", 0))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _reload_line(reload: dict[str, Any] | None) -> list[str]:
    """``last reload: ...`` (nothing before the first reload, or from an older daemon)."""
    if not reload or not reload.get("count") or reload.get("time") is None:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reload["time"]))
    ago = _age(max(0.0, time.time() - reload["time"]))
    if reload["result"] == "applied":
        what = ", ".join(reload.get("changes") or []) or "nothing changed"
        verdict = f"applied: {what}"
    else:
        verdict = f"REFUSED, previous configuration kept: {reload.get('error')}"
    return [f"last reload: {when} ({ago} ago) {verdict} ({reload['count']} since start)"]


def format_status(snap: dict[str, Any]) -> str:
    """The human-readable ``vhostd status`` output."""
    warned = [p["name"] for p in snap["ports"] if p.get("warnings")]
    build = snap.get("build")
    lines = [
        f"vhostd pid {snap['pid']}"
        + (f" ({build['version']}, data path {build['native']})" if build else "")
        + f", up {snap['uptime_seconds']:.0f}s, "
        f"{'healthy' if snap['healthy'] else 'NOT healthy'}"
        + (f", WARNINGS on {', '.join(warned)}" if warned else "")
        + (f", metrics {snap['metrics']}" if snap.get("metrics") else ""),
        *_reload_line(snap.get("reload")),
        "",
    ]
    rows = [
        ["PORT", "STATE", "MODE", "QP", "FEATURES", "STATUS", "MAC", "CONN", "ERRORS", "SOCKET"]
    ]
    for p in snap["ports"]:
        rows.append(
            [
                p["name"],
                p["state"],
                p["mode"],
                str(p["queue_pairs"]),
                p["features"],
                "|".join(p["device_status_names"]) or "-",
                p.get("mac") or "-",
                str(p["connections"]),
                str(_errors(p)),
                p["socket"],
            ]
        )
    lines += _table(rows)
    for p in snap["ports"]:
        lines += ["", f"port {p['name']}:"]
        for w in p.get("warnings", []):
            lines.append(f"  WARNING ({w['code']}): {w['message']}")
        if p["connected"]:
            mac, macs = p.get("mac"), p.get("macs") or []
            if mac:
                others = f" (learnt here: {' '.join(macs)})" if macs and macs != [mac] else ""
                lines.append(f"  guest MAC: {mac}{others}")
            lines.append(f"  features: {' '.join(p['feature_names']) or '-'}")
            lines.append(f"  protocol features: {' '.join(p['protocol_feature_names']) or '-'}")
        if p.get("logging"):
            lines.append(f"  logging for live migration: {p['log_pages']} pages logged")
        err = p.get("last_error")
        if err:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))
            lines.append(
                f"  last error: {stamp} ({_age(err['age_seconds'])} ago) "
                f"{err['kind']}: {err['message']}"
            )
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
        if p.get("memory_faults"):
            problems["memory_faults"] = p["memory_faults"]
        if problems:
            lines.append("  errors: " + ", ".join(f"{k}={n}" for k, n in problems.items()))
        off = p.get("offload")
        if off and (off["negotiated"] or off["segmented"] or off["bad_headers"]):
            tx, rx = p["totals"]["tx"], p["totals"]["rx"]
            lines.append(
                f"  offloads: {' '.join(off['negotiated']) or '-'}; GSO frames "
                f"{tx['gso_packets']} in, {rx['gso_packets']} out whole; "
                f"{off['segmented']} segmented ({off['segments']} segments), "
                f"{off['csum_completed']} checksums completed"
            )
            if off["bad_headers"]:
                lines.append(
                    "  bad headers: " + ", ".join(f"{k}={n}" for k, n in off["bad_headers"].items())
                )
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


def format_fdb(snap: dict[str, Any]) -> str:
    """The switch's MAC table as ``vhostd fdb`` prints it."""
    entries = snap.get("fdb", [])
    rows = [["MAC", "PORT", "AGE"]]
    for e in entries:
        where = e["port"] + (" (tap)" if e["kind"] == "tap" else "")
        rows.append([e["mac"], where, f"{e['age_seconds']:.0f}s"])
    sw = snap["switch"]
    return (
        "\n".join([*_table(rows), f"{len(entries)} of at most {sw['mac_table_size']} entries"])
        + "\n"
    )
