"""What a SIGHUP may change in a running daemon, decided before anything changes.

Kept apart from parsing (``config``): this compares two valid configurations
and says which ports and taps come and go, and what must be refused because
it would disturb a connected guest. The daemon then applies a plan all or
nothing (``Daemon.reload``) and records the outcome in a :class:`ReloadStatus`,
which ``vhostd status --json`` shows as ``reload`` and :func:`request_reload`
(``vhostd reload``) waits for.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from .config import DaemonConfig, PortConfig, TapConfig
from .runtime import lock_holder, lock_path

RELOAD_TIMEOUT = 30.0


@dataclass(slots=True)
class ReloadPlan:
    """What a SIGHUP with a new file would change.

    A reload must not disturb a running guest, so only whole ports and taps
    come and go; anything that would change a live port is refused. The
    daemon should apply a plan only when `refused` is empty (all or nothing),
    so that what runs is always some version of the file.
    """

    add_ports: list[PortConfig] = field(default_factory=list)
    remove_ports: list[PortConfig] = field(default_factory=list)
    add_taps: list[TapConfig] = field(default_factory=list)
    remove_taps: list[TapConfig] = field(default_factory=list)
    log_level: str | None = None  # the new level when it changed
    refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    @property
    def empty(self) -> bool:
        return (
            not (self.add_ports or self.remove_ports or self.add_taps or self.remove_taps)
            and self.log_level is None
        )


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    changed: list[str] = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            changed += _changed_fields(a, b, f"{prefix}{f.name}.")
        elif a != b:
            changed.append(f"{prefix}{f.name}")
    return changed


def diff_for_reload(old: DaemonConfig, new: DaemonConfig) -> ReloadPlan:
    """Compare the running configuration with a newly loaded one."""
    plan = ReloadPlan()
    old_ports = {p.name: p for p in old.ports}
    new_ports = {p.name: p for p in new.ports}
    for name, port in new_ports.items():
        if name not in old_ports:
            plan.add_ports.append(port)
        elif changed := _changed_fields(old_ports[name], port):
            plan.refused.append(
                f"port {name!r}: changing {', '.join(changed)} would disconnect its guest; "
                "remove the port, reload, then add it back (or restart vhostd)"
            )
    plan.remove_ports = [p for name, p in old_ports.items() if name not in new_ports]
    removed_sockets = {p.socket: p.name for p in plan.remove_ports}
    for port in plan.add_ports:
        if port.socket in removed_sockets:
            plan.refused.append(
                f"port {port.socket}: renaming port {removed_sockets[port.socket]!r} to "
                f"{port.name!r} would disconnect its guest; restart vhostd instead"
            )

    old_taps = {t.name: t for t in old.taps}
    new_taps = {t.name: t for t in new.taps}
    plan.add_taps = [t for name, t in new_taps.items() if name not in old_taps]
    plan.remove_taps = [t for name, t in old_taps.items() if name not in new_taps]
    for name, tap in new_taps.items():
        if name in old_taps and old_taps[name] != tap:
            plan.refused.append(
                f"tap {name!r}: changing mtu or offloads needs the tap removed and re-added"
            )

    if old.log_level != new.log_level:
        plan.log_level = new.log_level
    for label, a, b in (
        ("metrics.listen", old.metrics, new.metrics),
        ("control_socket", old.control_socket, new.control_socket),
        ("switch", old.switch, new.switch),
    ):
        if a != b:
            plan.refused.append(f"{label}: changing it needs a restart of vhostd")
    return plan


@dataclass(slots=True)
class ReloadStatus:
    """The last reload's outcome.

    As the snapshot's ``reload`` object: ``count`` (reloads tried since start),
    ``result`` (``"applied"``, ``"refused"``, null before the first), ``time``
    (Unix seconds of the last one, null before), ``error`` (why it was refused,
    problems joined by ``"; "``, else null) and ``changes`` (what an applied one
    changed, e.g. ``"added port vm2"``, ``"log_level debug"``).
    """

    loaded_at: float = field(default_factory=time.time)
    """Unix seconds the running configuration was first loaded (start-up)."""
    count: int = 0
    result: str | None = None
    time: float | None = None
    error: str | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        """False while the last reload stands refused."""
        return self.result != "refused"

    @property
    def timestamp(self) -> float:
        """The last reload's time, or start-up's before any."""
        return self.loaded_at if self.time is None else self.time

    def applied(self, changes: list[str], now: float | None = None) -> None:
        self._record("applied", None, changes, now)

    def refused(self, problems: list[str], now: float | None = None) -> None:
        self._record("refused", "; ".join(problems), [], now)

    def _record(
        self, result: str, error: str | None, changes: list[str], now: float | None
    ) -> None:
        self.count += 1
        self.result, self.error, self.changes = result, error, list(changes)
        self.time = time.time() if now is None else now

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "result": self.result,
            "time": self.time,
            "error": self.error,
            "changes": list(self.changes),
        }


def request_reload(control_socket: str, timeout: float = RELOAD_TIMEOUT) -> tuple[int, str]:
    """``vhostd reload``: SIGHUP the daemon and wait for its verdict.

    The daemon is found through its control socket (the snapshot's ``pid``) or,
    when that does not answer, the PID in its instance lock; then the snapshot's
    ``reload.count`` is polled until it moves. Returns (exit status, message):
    0 applied (or signalled but unconfirmable without a control socket),
    1 refused, or no daemon found, or no answer within ``timeout``.
    """
    from .control import fetch

    try:
        snap = fetch(control_socket)
    except (OSError, ValueError) as exc:
        return _signal_lock_holder(control_socket, exc)
    pid = int(snap["pid"])
    before = snap.get("reload")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return 1, f"vhostd: cannot signal vhostd pid {pid}: {exc.strerror}"
    if before is None:
        return 0, f"sent SIGHUP to vhostd pid {pid}; it does not report reloads: see its log"
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.05)
        try:
            now = fetch(control_socket).get("reload") or before
        except (OSError, ValueError):
            now = before
        if now["count"] > before["count"]:
            break
        if time.monotonic() > deadline:
            return 1, f"vhostd: sent SIGHUP to vhostd pid {pid}, no result within {timeout:.0f}s"
    if now["result"] == "applied":
        changed = ", ".join(now["changes"]) or "nothing changed"
        return 0, f"vhostd pid {pid}: reload applied: {changed}"
    return 1, f"vhostd pid {pid}: reload refused, previous configuration kept: {now['error']}"


def _signal_lock_holder(control_socket: str, why: Exception) -> tuple[int, str]:
    reason = why.strerror if isinstance(why, OSError) and why.strerror else str(why)
    pid = lock_holder(control_socket)
    if not pid:
        return 1, (
            f"vhostd: no vhostd answers on {control_socket} ({reason}) and none holds "
            f"{lock_path(control_socket)}: is it running with this control socket?"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return 1, f"vhostd: cannot signal vhostd pid {pid}: {exc.strerror}"
    return 0, (
        f"sent SIGHUP to vhostd pid {pid} (from {lock_path(control_socket)}); its control "
        f"socket does not answer ({reason}), so only its log tells the result"
    )
