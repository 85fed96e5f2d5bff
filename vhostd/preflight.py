"""What ``vhostd check-config`` checks of the running system, beyond the file itself.

A valid file can still fail to start: a socket directory that does not exist, an
owner that is not a user, a group the daemon may not give sockets to, a TAP it
may not create, a metrics port or control socket someone else holds. These are
checked here as far as they can be without changing anything, and reported like
file problems (``FILE:LINE: key: message``) on the key to fix.

The checks run with the rights of whoever runs ``check-config`` (the daemon's
user, with its capabilities, gets the daemon's answers). When a vhostd already
runs with this file's control socket (it holds the instance lock), what that
daemon holds (its sockets, TAPs, metrics port) counts as free: the check is
then about what a reload or restart would meet.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigProblem, DaemonConfig, MetricsConfig, PortConfig, TapConfig
from .runtime import file_kind, lock_holder, lock_path, socket_answers, user_name
from .tap import IFF_TAP, TUN_DEVICE
from .tomlpos import KeyLines

CAP_NET_ADMIN = 12
IFF_MULTI_QUEUE = 0x0100
SYS_CLASS_NET = Path("/sys/class/net")


@dataclass
class _Report:
    lines: KeyLines
    filename: str
    problems: list[ConfigProblem] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.lines.line_of(path), path, message, self.filename))


def check_system(
    config: DaemonConfig, text: str, filename: str
) -> tuple[list[ConfigProblem], list[str]]:
    """(problems, notes) for running ``config`` (read from ``text``) on this system."""
    report = _Report(KeyLines.scan(text), filename)
    notes: list[str] = []
    running = lock_holder(config.control_socket)
    snap: dict[str, Any] | None = None
    if running is not None:
        from .control import fetch

        try:
            snap = fetch(config.control_socket, timeout=2.0)
        except (OSError, ValueError):
            snap = None
        notes.append(
            f"vhostd pid {running or '?'} runs with control socket {config.control_socket}: "
            "what it holds counts as free"
        )
    _control(report, config.control_socket, running is not None)
    served = {p["socket"] for p in snap["ports"]} if snap else set()
    held_taps = {t["name"] for t in snap["taps"]} if snap else set()
    for i, port in enumerate(config.ports):
        if not port.client:
            _port(report, f"port[{i}]", port, served)
    if config.taps and not os.path.exists(TUN_DEVICE):
        report.add("tap", f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)")
    for i, tap in enumerate(config.taps):
        _tap(report, f"tap[{i}]", tap, held_taps)
    _metrics(report, config.metrics, snap)
    return sorted(report.problems, key=lambda p: (p.line is None, p.line or 0)), notes


def _writable_dir(report: _Report, key: str, directory: str, what: str, fix: str) -> None:
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        report.add(key, f"directory {directory} does not exist: create it or {fix}")
        return
    except OSError as exc:
        report.add(key, f"directory {directory}: {exc.strerror}: {fix}")
        return
    if not stat.S_ISDIR(st.st_mode):
        report.add(key, f"{directory} is {file_kind(st.st_mode)}, not a directory: {fix}")
    elif not os.access(directory, os.W_OK | os.X_OK):
        report.add(
            key,
            f"directory {directory} is not writable for user {user_name()}: vhostd cannot "
            f"create {what} there: change its owner or mode, or {fix}",
        )


def _control(report: _Report, path: str, running: bool) -> None:
    key = "control_socket"
    fix = "fix control_socket="
    directory = os.path.dirname(path) or "/"
    if os.path.exists(directory) or not running:
        nearest = directory
        while not os.path.exists(nearest):  # vhostd creates a missing runtime directory
            nearest = os.path.dirname(nearest)
        _writable_dir(report, key, nearest, f"the control socket and {lock_path(path)}", fix)
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        report.add(
            key,
            f"{path} exists and is {file_kind(st.st_mode)}, not a socket (vhostd never removes "
            f"it): move it away or {fix}",
        )
    elif not running and _answers(path):
        report.add(key, f"another process answers on {path}: stop it or {fix}")


def _answers(path: str) -> bool:
    try:
        return socket_answers(path)
    except OSError:
        return True


def _port(report: _Report, key: str, port: PortConfig, served: set[str]) -> None:
    path = port.socket
    fix = "fix socket="
    _writable_dir(report, f"{key}.socket", os.path.dirname(path) or "/", "the socket", fix)
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        report.add(
            f"{key}.socket",
            f"{path} exists and is {file_kind(st.st_mode)}, not a socket (vhostd never removes "
            f"it): move it away or {fix}",
        )
    elif st is not None and path not in served and _answers(path):
        report.add(f"{key}.socket", f"another process already serves {path}: stop it or {fix}")
    root = os.geteuid() == 0
    if port.owner is not None:
        try:
            uid = pwd.getpwnam(port.owner).pw_uid
        except KeyError:
            report.add(f"{key}.owner", f"{port.owner!r} is not a user on this system")
        else:
            if not root and uid != os.geteuid():
                report.add(
                    f"{key}.owner",
                    f"user {user_name()} may not give its sockets to user {port.owner!r} "
                    "(only root may)",
                )
    if port.group is not None:
        try:
            gid = grp.getgrnam(port.group).gr_gid
        except KeyError:
            report.add(f"{key}.group", f"{port.group!r} is not a group on this system")
        else:
            if not root and gid != os.getegid() and gid not in os.getgroups():
                report.add(
                    f"{key}.group",
                    f"user {user_name()} is not in group {port.group!r}, so it may not give "
                    "its sockets to it: add the user to the group or fix group=",
                )


def has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _sysfs(name: str, attr: str) -> str | None:
    try:
        return (SYS_CLASS_NET / name / attr).read_text().strip()
    except OSError:
        return None


def _tap(report: _Report, key: str, tap: TapConfig, held: set[str]) -> None:
    name = tap.name
    exists = (SYS_CLASS_NET / name).exists()
    if exists:
        flags_text = _sysfs(name, "tun_flags")
        if flags_text is None:
            report.add(
                f"{key}.name",
                f"an interface {name} exists and is not a TAP (ip -d link show {name}): remove "
                "it or fix name=",
            )
            return
        flags = int(flags_text, 16)
        if not flags & IFF_TAP or flags & IFF_MULTI_QUEUE:
            report.add(
                f"{key}.name",
                f"{name} is a {'TUN' if not flags & IFF_TAP else 'multi-queue TAP'}, not a "
                "single-queue TAP: remove it or fix name=",
            )
            return
        if name not in held and _sysfs(name, "carrier") == "1":
            report.add(
                f"{key}.name",
                f"TAP {name} is busy: another process has it open (its carrier is up): stop "
                "it or fix name=",
            )
    if has_cap_net_admin():
        return
    # The kernel's tun_not_capable(): an owner or group that is set must match.
    owner, group = _sysfs(name, "owner"), _sysfs(name, "group")  # "-1": none set
    groups = {str(g) for g in (os.getegid(), *os.getgroups())}
    mine = exists and owner in ("-1", str(os.geteuid())) and group in ("-1", *groups)
    if not mine:
        user = user_name()
        why = (
            f"TAP {name} belongs to another user or group"
            if exists
            else f"so it cannot create TAP {name}"
        )
        report.add(
            f"{key}.name",
            f"user {user} lacks CAP_NET_ADMIN, {why}: grant CAP_NET_ADMIN, or pre-create the "
            f"TAP for it: ip tuntap add dev {name} mode tap user {user}",
        )
        return
    up = int(_sysfs(name, "flags") or "0", 16) & 1
    mtu_ok = tap.mtu is None or _sysfs(name, "mtu") == str(tap.mtu)
    if not (up and mtu_ok):
        mtu = f" mtu {tap.mtu}" if tap.mtu is not None else ""
        report.add(
            f"{key}.name",
            f"without CAP_NET_ADMIN vhostd cannot configure TAP {name}: do it beforehand "
            f"(ip link set {name}{mtu} up)",
        )


def _metrics(report: _Report, metrics: MetricsConfig, snap: dict[str, Any] | None) -> None:
    address = metrics.address
    if address is None or address[1] == 0:
        return
    host, port = address
    if snap is not None and str(snap.get("metrics") or "").endswith(f":{port}"):
        return  # the running daemon's own
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            message = f"{metrics.listen} is in use by another process: fix listen="
        else:
            message = f"cannot listen on {metrics.listen}: {exc.strerror or exc}: fix listen="
        report.add("metrics.listen", message)
