"""What a SIGHUP may change in a running daemon, decided before anything changes.

Kept apart from parsing (``config``): this compares two valid configurations
and says which ports and taps come and go, and what must be refused because
it would disturb a connected guest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import DaemonConfig, PortConfig, TapConfig


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
            plan.refused.append(f"tap {name!r}: changing mtu needs the tap removed and re-added")

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
