"""The parts of the systemd service protocol vhostd uses, without libsystemd.

Three small protocols, each an environment variable set by the service
manager plus, for notify, a datagram:

- sd_notify: `NOTIFY_SOCKET` names an AF_UNIX datagram socket (a path, or an
  abstract name written with a leading `@`); the daemon sends newline
  separated `KEY=VALUE` assignments such as `READY=1`.
- watchdog: `WATCHDOG_USEC` (and optionally `WATCHDOG_PID`) ask for a
  `WATCHDOG=1` notification more often than every `WATCHDOG_USEC`; systemd
  recommends pinging at half of it. The ping runs as a trio task, so a stuck
  event loop stops the pings and systemd restarts the daemon: that is the point.
- socket activation: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` describe
  sockets passed as fds 3, 4, ... (from `FileDescriptorName=` in the socket
  unit). Taking them over means listening sockets (and the guests' paths)
  survive a daemon restart; :mod:`vhostd.activation` makes them ports.

Outside systemd every function is a harmless no-op, so the daemon needs no
"am I under systemd" switch. The environment is a parameter so tests need not
patch `os.environ`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import Final

import trio

log = logging.getLogger(__name__)

LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START
_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address to send notifications to, or None if there is none we can use.

    Only AF_UNIX is supported (`vsock:` addresses, used in VMs, are not).
    """
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to the service manager.

    Returns False when not running under systemd or when sending failed; a
    failure is logged, not raised, because losing a status update must not
    take the daemon down (a missed watchdog ping is handled by systemd itself).
    """
    address = notify_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %r failed: %s", address.replace("\0", "@"), exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: STATUS text must not inject one.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Start-up finished: every configured socket is listening (Type=notify)."""
    extra = f"\nSTATUS={_one_line(status_text)}" if status_text else ""
    return notify(f"READY=1{extra}", env)


def reloading(env: Mapping[str, str] | None = None) -> bool:
    """A SIGHUP reload started; follow with ready() when it is done."""
    return notify("RELOADING=1", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """Shutdown started, so `systemctl status` shows "deactivating" at once."""
    return notify("STOPPING=1", env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """One line shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}", env)


def watchdog_ping(env: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", env)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog applies to us.

    This is systemd's timeout (WatchdogSec=); ping at least twice as often,
    as `watchdog_task` does. `WATCHDOG_PID`, when set, must be our pid: the
    variables may have leaked from a parent that was the supervised process.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if "WATCHDOG_PID" in env:
        try:
            if int(env["WATCHDOG_PID"]) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def watchdog_task(
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the watchdog every timeout/2 seconds until cancelled.

    `timeout` defaults to `watchdog_interval(env)`; with no watchdog the task
    returns at once, so the daemon can always start it.
    """
    if timeout is None:
        timeout = watchdog_interval(env)
    task_status.started()
    if timeout is None:
        return
    while True:
        watchdog_ping(env)
        await trio.sleep(timeout / 2)


def listen_fds(
    env: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    *,
    unset: bool = True,
) -> list[tuple[str, socket.socket]]:
    """Take over the sockets systemd passed to this process, with their names.

    The fds are made close-on-exec (systemd passes them inheritable) and, with
    `unset`, the LISTEN_* variables are removed so no child process thinks
    they are meant for it. Names come from LISTEN_FDNAMES; a missing or short
    list gives "unknown", systemd's own default. An fd that is not a socket
    (a FIFO from ListenFIFO=) is closed and skipped with a warning: vhostd only
    knows sockets.
    """
    env = os.environ if env is None else env
    pid_text = env.get("LISTEN_PID", "")
    count_text = env.get("LISTEN_FDS", "")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    try:
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return []
        count = int(count_text)
    except ValueError:
        return []
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        names = ["unknown"] * count
    result: list[tuple[str, socket.socket]] = []
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("inherited fd %d (%s) is not a usable socket: %s", fd, name, exc)
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        result.append((name, sock))
    return result
