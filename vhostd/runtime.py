"""vhostd's footprint on the running system: what it may take over, hold and remove.

- The instance lock: ``flock`` on a file next to the control socket
  (``/run/vhostd/control.lock`` for ``/run/vhostd/control.sock``; the name is the
  control socket's with ``.lock`` for ``.sock``). It holds the daemon's PID while
  it runs, so a second ``vhostd run`` with the same control socket refuses to
  start and names the first one, and ``vhostd reload`` can find the daemon when
  the control socket does not answer.
- Socket files: a path is taken over only when it is absent or a socket nobody
  answers on (a stale one, left by a daemon that was killed). A path that is not
  a socket is never removed, and a live listener is never replaced. At exit a
  daemon removes only the socket files it created itself, recognised by device
  and inode, so a file someone else put there meanwhile survives.
- Errors an operator must fix (:class:`SetupError`): one line each, naming the
  port or TAP, the path and the fix. ``vhostd run`` prints them and exits with
  :data:`EX_CONFIG`; a reload that meets one is refused as a whole.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

EX_CONFIG: Final = 78
"""sysexits.h EX_CONFIG: the configuration (or what it names on this system) must be
fixed before a restart can succeed. ``vhostd run`` exits with it for every
problem it reports as a :class:`SetupError` or a configuration file error."""

PROBE_TIMEOUT: Final = 1.0
LOCK_RETRY_SECONDS: Final = 0.2  # someone probing the lock holds it for microseconds


class SetupError(Exception):
    """Problems that stop a start or a reload; each is one line for an operator."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def runtime_file(control_socket: str, suffix: str) -> str:
    """A file of this instance next to its control socket: ``control.sock`` -> ``control.taps``."""
    base = control_socket.removesuffix(".sock")
    return base + suffix


def lock_path(control_socket: str) -> str:
    return runtime_file(control_socket, ".lock")


def user_name(uid: int | None = None) -> str:
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def file_kind(mode: int) -> str:
    """``a regular file``, ``a directory``... for a message about a path's type."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a socket"


# -- the instance lock ---------------------------------------------------------------


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class InstanceLock:
    """The flock that makes one daemon per control socket; holds the PID."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, control_socket: str) -> InstanceLock:
        """Lock, or raise SetupError naming the PID that holds the lock."""
        path = lock_path(control_socket)
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise SetupError(
                f"runtime directory {directory}: cannot create it: {exc.strerror}: create it "
                "or fix control_socket= (--control-socket)"
            ) from None
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise SetupError(
                    f"instance lock {path}: cannot open it: {exc.strerror}: make {directory} "
                    f"writable for user {user_name()} or fix control_socket= (--control-socket)"
                ) from None
            if not _flock(fd):
                pid = _read_pid(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "another process"
                raise SetupError(
                    f"another vhostd ({who}) runs with control socket {control_socket} "
                    f"(it holds {path}): stop it first, or give this one its own "
                    "control_socket= (--control-socket)"
                )
            # The previous holder removes the file as it exits: if it did so after we
            # opened it, our lock is on a file nobody else will ever open. Again.
            try:
                same = _same_file(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file (while still holding it), then unlock."""
        if self.fd < 0:
            return
        try:
            if _same_file(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _flock(fd: int) -> bool:
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_holder(control_socket: str) -> int | None:
    """The PID of the daemon holding the instance lock, 0 if it is held but the PID
    is unknown, None when no daemon holds it."""
    path = lock_path(control_socket)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None
    finally:
        os.close(fd)


# -- socket files ------------------------------------------------------------------


def socket_answers(path: str) -> bool:
    """True when a listener accepts connections on ``path`` (someone serves it).

    Refused or absent means stale; a full backlog still means a live listener.
    Other errors (no permission to connect, a socket of another type) are raised.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            return True
    return True


def check_directory(directory: str, who: str, key: str) -> None:
    """The directory a socket goes in exists (vhostd never creates a port's directory)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise SetupError(
            f"{who}: socket directory {directory} does not exist: create it or fix {key}"
        ) from None
    except OSError as exc:
        problem = f"{who}: socket directory {directory}: {exc.strerror}: fix {key}"
        raise SetupError(problem) from None
    if not stat.S_ISDIR(st.st_mode):
        kind = file_kind(st.st_mode)
        raise SetupError(f"{who}: {directory} is {kind}, not a directory: fix {key}")


def claim_socket_path(path: str, who: str, key: str = "socket=") -> None:
    """Make ``path`` free to bind, or raise SetupError saying why it is not ours to take.

    Absent: nothing to do. A socket nobody answers on: removed (stale). Anything
    else (a live listener, a regular file, a directory...) is left alone.
    """
    check_directory(os.path.dirname(path) or "/", who, key)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(
            f"{who}: {path} exists and is {file_kind(st.st_mode)}, not a socket (vhostd never "
            f"removes it): move it away or fix {key}"
        )
    try:
        live = socket_answers(path)
    except OSError as exc:
        raise SetupError(
            f"{who}: cannot tell whether something serves {path}: {exc.strerror}: remove it if "
            f"it is stale, or fix {key}"
        ) from None
    if live:
        raise SetupError(
            f"{who}: a running process (another vhostd?) already serves {path}: stop it or "
            f"fix {key}"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SetupError(
            f"{who}: cannot remove the stale socket {path}: {exc.strerror}: remove it or fix {key}"
        ) from None
    log.info("%s: removed the stale socket %s (nothing answered there)", who, path)


@dataclass(frozen=True, slots=True)
class FileId:
    """Which file a path named when we created it."""

    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> FileId:
        st = os.lstat(path)
        return cls(st.st_dev, st.st_ino)


def remove_own_socket(path: str, created: FileId) -> bool:
    """Unlink ``path`` if it is still the socket we created; True when removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot check %s before removing it: %s", path, exc.strerror)
        return False
    if not stat.S_ISSOCK(st.st_mode) or FileId(st.st_dev, st.st_ino) != created:
        log.warning("%s is no longer the socket this vhostd created: leaving it", path)
        return False
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)
        return False
    return True


def resolve_owner(owner: str | None, group: str | None, who: str) -> tuple[int, int]:
    """(uid, gid) for chown, -1 for what stays; unknown names raise SetupError."""
    uid = gid = -1
    if owner:
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise SetupError(
                f"{who}: owner {owner!r} is not a user on this system: create the user or "
                "fix owner="
            ) from None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SetupError(
                f"{who}: group {group!r} is not a group on this system: create the group or "
                "fix group="
            ) from None
    return uid, gid


def chown_problem(who: str, path: str, owner: str | None, group: str | None, exc: OSError) -> str:
    """The one line for a socket file vhostd may not give away."""
    to = " and ".join(
        part for part in (owner and f"user {owner!r}", group and f"group {group!r}") if part
    )
    if exc.errno == errno.EPERM:
        return (
            f"{who}: user {user_name()} may not give {path} to {to} (without root, vhostd can "
            "only give its sockets to groups it is a member of): add the user to the group, "
            "or fix owner=/group="
        )
    return f"{who}: cannot give {path} to {to}: {exc.strerror}: fix owner=/group="
