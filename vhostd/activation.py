"""Socket activation: every socket the service manager passes becomes a port.

systemd (a ``vhostd@NAME.socket`` unit, or ``systemd-socket-activate -l PATH
--fdname=NAME``) listens on a vhost-user socket and hands it to ``vhostd run``
(``LISTEN_FDS``/``LISTEN_FDNAMES``, see :func:`vhostd.systemd.listen_fds`). The
rules, applied at start-up and again to the file at every reload:

- Each passed socket is a port. Its name is the socket's ``FileDescriptorName=``;
  when there is none (systemd's ``unknown``, or the unit's own name ending in
  ``.socket``), is not a valid port name, or an earlier socket already has it, the
  name is the socket file's stem, as for a ``[[port]]`` without ``name``.
- A ``[[port]]`` configures it when the port's ``name`` is that name or, failing
  that, when its ``socket`` is the socket's path. Everything else in that
  ``[[port]]`` applies, except ``socket`` (the path is the passed socket's, which
  status shows) and ``owner``/``group``/``socket_mode`` (the socket unit's
  ``SocketUser=``/``SocketGroup=``/``SocketMode=`` made the file).
- A passed socket no ``[[port]]`` configures is served with the default settings
  (a switch port), with or without a configuration file, and one log line says so:
  enabling ``vhostd@vm3.socket`` is enough to serve vm3. Refusing would take every
  guest of the host down over one unconfigured socket; closing it (what vhostd used
  to do) leaves the guest's QEMU with a reset connection and nothing in any log.
- The passed sockets stay the daemon's until it exits: never unlinked, never
  bound again, not at a reload either (a reload cannot remove such a port: without
  its ``[[port]]`` it is a default port again, so the reload is only refused when
  that changes a setting). Only systemd creates and removes their files.

What cannot work stops the start with one line (exit 78, see :mod:`vhostd.runtime`):
a passed fd that is not a listening Unix stream socket bound to a path, a
``[[port]]`` with ``client = true`` for a passed socket, a ``[[port]]`` whose own
``socket`` is another passed socket's path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from . import systemd
from .config import DaemonConfig, PortConfig
from .runtime import SetupError

log = logging.getLogger(__name__)

_PORT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as config.py's port names
NO_NAME = "unknown"
"""What ``LISTEN_FDNAMES`` says (and :func:`systemd.listen_fds` gives) for a socket
passed without a name."""


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket the service manager passed, and the port it becomes."""

    name: str
    """The port's name (see the module's rules)."""
    fd_name: str
    """Its ``FileDescriptorName=`` as passed (``unknown`` when none was)."""
    path: str
    """Where it listens: ``getsockname()``, made absolute."""
    sock: socket.socket


def _describe(sock: socket.socket) -> str:
    try:
        family = socket.AddressFamily(sock.family).name
    except ValueError:
        family = f"family {sock.family}"
    try:
        kind = socket.SocketKind(sock.type).name
    except ValueError:
        kind = f"type {sock.type}"
    return f"{family} {kind}"


def _socket_path(fd_name: str, sock: socket.socket) -> str:
    """The passed socket's path, or SetupError saying why vhost-user cannot use it."""
    who = f"socket passed by the service manager as {fd_name!r} (fd {sock.fileno()})"
    fix = "vhost-user needs a Unix stream socket: ListenStream=/run/vhostd/NAME.sock"
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SetupError(f"{who} is an {_describe(sock)} socket: {fix}")
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        address: object = sock.getsockname()
    except OSError as exc:
        raise SetupError(f"{who}: {exc.strerror}: {fix}") from None
    if not listening:
        raise SetupError(
            f"{who} is not listening (Accept=yes passes connections): {fix}, with Accept=no"
        )
    if not isinstance(address, str) or not address or address.startswith("\0"):
        shown = "an abstract" if address else "an unnamed"
        raise SetupError(f"{who} is {shown} socket, not a file QEMU can connect to: {fix}")
    return os.path.normpath(os.path.abspath(address))


def _given_name(fd_name: str) -> bool:
    """Whether a FileDescriptorName= was given: systemd's default is the socket unit's
    own name (``vhostd.socket``), and ``unknown`` stands for none."""
    return fd_name != NO_NAME and not fd_name.endswith(".socket")


def _port_name(fd_name: str, path: str, taken: set[str]) -> str | None:
    """FileDescriptorName= when it can be a port's name, else the file's stem; None if
    neither can."""
    if _given_name(fd_name) and _PORT_NAME.fullmatch(fd_name) and fd_name not in taken:
        return fd_name
    stem = PurePosixPath(path).stem
    if _PORT_NAME.fullmatch(stem) and stem not in taken:
        return stem
    return None


def inherited_sockets(passed: Iterable[tuple[str, socket.socket]]) -> list[InheritedSocket]:
    """Name and check what the service manager passed; SetupError listing every socket
    that cannot be a port (all of them closed then)."""
    passed = list(passed)
    result: list[InheritedSocket] = []
    problems: list[str] = []
    taken: set[str] = set()
    for fd_name, sock in passed:
        try:
            path = _socket_path(fd_name, sock)
        except SetupError as exc:
            problems += exc.problems
            continue
        name = _port_name(fd_name, path, taken)
        if name is None:
            problems.append(
                f"socket passed by the service manager as {fd_name!r} ({path}): neither that "
                "name nor the file's stem can name a port (1-64 of A-Z a-z 0-9 _ . -, each "
                "used once): fix FileDescriptorName="
            )
            continue
        if name != fd_name and _given_name(fd_name):
            log.warning(
                "port %s: the socket passed as %r (%s) is named after its file: %r is not a "
                "valid port name or is taken",
                name, fd_name, path, fd_name,
            )  # fmt: skip
        taken.add(name)
        result.append(InheritedSocket(name, fd_name, path, sock))
    if problems:
        for _, sock in passed:
            sock.close()
        raise SetupError(problems)
    return result


def take_inherited() -> list[InheritedSocket]:
    """The sockets this process was passed (none outside socket activation)."""
    return inherited_sockets(systemd.listen_fds())


def adopt(
    config: DaemonConfig,
    inherited: Sequence[InheritedSocket],
    source: str | None = None,
    *,
    quiet: bool = False,
) -> DaemonConfig:
    """``config`` with a port for every inherited socket (see the module's rules).

    ``source`` names the file for log lines. SetupError (one line each) when a
    ``[[port]]`` cannot be one of the sockets. ``quiet`` skips the log lines that
    were already said at start-up (a reload applies the same rules again).
    """
    if not inherited:
        return config
    where = (
        f"no [[port]] in {source} has that name or socket" if source else "no configuration file"
    )
    ports = list(config.ports)
    by_name = {p.name: i for i, p in enumerate(ports)}
    by_path = {p.socket: i for i, p in enumerate(ports)}
    problems: list[str] = []
    used: dict[int, InheritedSocket] = {}
    added: list[PortConfig] = []
    for inh in inherited:
        index = by_name.get(inh.name)
        if index is None or index in used:
            index = by_path.get(inh.path)
        if index is None or index in used:
            if not quiet:
                log.info(
                    "port %s: serving the socket the service manager passed (%s) with the "
                    "default settings: %s",
                    inh.name, inh.path, where,
                )  # fmt: skip
            added.append(PortConfig(name=inh.name, socket=inh.path))
            continue
        port = ports[index]
        if port.client:
            problems.append(
                f"port {port.name}: client = true, but the service manager passes a listening "
                f"socket for it ({inh.path}, {inh.fd_name!r}): drop client = true or stop "
                "that socket unit"
            )
            used[index] = inh
            continue
        if port.socket != inh.path and not quiet:
            log.info(
                "port %s: serving the socket the service manager passed, %s, not socket = %s "
                "from %s",
                port.name, inh.path, port.socket, source or "the command line",
            )  # fmt: skip
        used[index] = inh
        ports[index] = dataclasses.replace(port, socket=inh.path)
    inherited_paths = {inh.path: inh for inh in inherited}
    for i, port in enumerate(ports):
        other = inherited_paths.get(port.socket)
        if i not in used and other is not None:
            problems.append(
                f"port {port.name}: {port.socket} is the socket the service manager passes as "
                f"{other.fd_name!r} (port {other.name}): fix socket= or the socket unit"
            )
    if problems:
        raise SetupError(problems)
    return dataclasses.replace(config, ports=(*ports, *added))
