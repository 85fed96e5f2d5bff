"""Socket activation: every passed socket is a port, named by its FileDescriptorName=.

The rules themselves (``vhostd.activation``) are tested as functions; the rest drives
``python -m vhostd run`` the way systemd starts it: listening sockets the test bound
(systemd's job) become fds 3, 4, ... of the daemon with LISTEN_PID set to the daemon's
own PID (bash sets it to ``$$`` and execs the daemon in its place) and LISTEN_FDS,
LISTEN_FDNAMES. What the operator sees is checked: ``vhostd status``, the log, exit
status 78 with one line, and that the passed socket files are never removed or bound
again, not at a reload either.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.daemon import REPO
from tests.vusim.frontend import Frontend
from vhostd.activation import InheritedSocket, adopt, inherited_sockets
from vhostd.config import DaemonConfig, PortConfig, PortMode
from vhostd.control import fetch, format_status
from vhostd.runtime import EX_CONFIG, SetupError

# -- the rules, as functions -------------------------------------------------------


@pytest.fixture
def listeners(tmp_sock_dir: Path) -> Iterator[dict[str, socket.socket]]:
    """Listening sockets a.sock, b.sock, c.sock in a fresh directory, by stem."""
    socks: dict[str, socket.socket] = {}
    for stem in "abc":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_sock_dir / f"{stem}.sock"))
        sock.listen()
        socks[stem] = sock
    yield socks
    for sock in socks.values():
        sock.close()


def names(passed: list[InheritedSocket]) -> list[tuple[str, str]]:
    return [(inh.name, Path(inh.path).name) for inh in passed]


def test_names_come_from_file_descriptor_names_else_the_file(
    listeners: dict[str, socket.socket],
) -> None:
    a, b, c = listeners.values()
    assert names(inherited_sockets([("vm1", a), ("vm2", b)])) == [
        ("vm1", "a.sock"),
        ("vm2", "b.sock"),
    ]
    # No name (LISTEN_FDNAMES absent), systemd's default (the unit's name), a name that
    # cannot be a port's, a name taken by an earlier socket: the file's stem.
    assert names(inherited_sockets([("unknown", a), ("unknown", b)])) == [
        ("a", "a.sock"),
        ("b", "b.sock"),
    ]
    assert names(inherited_sockets([("vhostd.socket", a), ("vm 1", b), ("a", c)])) == [
        ("a", "a.sock"),
        ("b", "b.sock"),
        ("c", "c.sock"),
    ]
    assert names(inherited_sockets([("vm1", a), ("vm1", b)])) == [
        ("vm1", "a.sock"),
        ("b", "b.sock"),
    ]


def test_sockets_vhost_user_cannot_use_are_refused(tmp_sock_dir: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    unlistened = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unlistened.bind(str(tmp_sock_dir / "quiet.sock"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0vhostd-test-{os.getpid()}")
    abstract.listen()
    good = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    good.bind(str(tmp_sock_dir / "good.sock"))
    good.listen()
    passed = [("web", tcp), ("quiet", unlistened), ("hidden", abstract), ("good", good)]
    with pytest.raises(SetupError) as caught:
        inherited_sockets(passed)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("socket passed by the service manager as 'web' (fd ")
    assert "is an AF_INET SOCK_STREAM socket: vhost-user needs a Unix stream socket" in problems[0]
    assert "'quiet'" in problems[1] and "is not listening" in problems[1]
    assert "'hidden'" in problems[2] and "is an abstract socket" in problems[2]
    assert all(sock.fileno() == -1 for _, sock in passed)  # all closed, the good one too


def inherited(tmp: Path, *pairs: tuple[str, str]) -> list[InheritedSocket]:
    """InheritedSockets for (name, file) without real sockets (adopt never touches them)."""
    return [InheritedSocket(n, n, str(tmp / f), socket.socket()) for n, f in pairs]


def test_adopt_configures_by_name_then_by_path_else_defaults(tmp_path: Path) -> None:
    passed = inherited(tmp_path, ("vm1", "vm1.sock"), ("vm2", "x.sock"), ("vm3", "vm3.sock"))
    config = DaemonConfig(
        ports=(
            PortConfig("vm1", "/elsewhere/vm1.sock", mode=PortMode.REFLECT, mtu=9000),
            PortConfig("guest", str(tmp_path / "x.sock"), mode=PortMode.SINK),
            PortConfig("own", str(tmp_path / "own.sock")),
        )
    )
    adopted = adopt(config, passed, "vhostd.toml")
    assert adopted.ports == (
        # Configured by name: the file's settings, the passed socket's path.
        PortConfig("vm1", str(tmp_path / "vm1.sock"), mode=PortMode.REFLECT, mtu=9000),
        # Configured by path (its name is the file's).
        PortConfig("guest", str(tmp_path / "x.sock"), mode=PortMode.SINK),
        PortConfig("own", str(tmp_path / "own.sock")),  # vhostd binds this one itself
        PortConfig("vm3", str(tmp_path / "vm3.sock")),  # not configured: the defaults
    )
    assert adopt(adopted, passed, "vhostd.toml", quiet=True) == adopted  # as at each reload
    assert adopt(DaemonConfig(), passed).ports == tuple(
        PortConfig(inh.name, inh.path) for inh in passed
    )
    assert adopt(config, []) is config


def test_adopt_refuses_what_cannot_be_one_of_the_sockets(tmp_path: Path) -> None:
    passed = inherited(tmp_path, ("vm1", "vm1.sock"), ("vm2", "vm2.sock"))
    client = DaemonConfig(ports=(PortConfig("vm1", "/run/qemu/vm1.sock", client=True),))
    with pytest.raises(SetupError) as caught:
        adopt(client, passed)
    assert caught.value.problems == [
        f"port vm1: client = true, but the service manager passes a listening socket for it "
        f"({tmp_path}/vm1.sock, 'vm1'): drop client = true or stop that socket unit"
    ]
    # vm1's [[port]] takes the passed vm1; 'other' names vm1's path for itself.
    clash = DaemonConfig(
        ports=(
            PortConfig("vm1", str(tmp_path / "a.sock")),
            PortConfig("other", str(tmp_path / "vm1.sock")),
        )
    )
    with pytest.raises(SetupError) as caught:
        adopt(clash, passed)
    assert caught.value.problems == [
        f"port other: {tmp_path}/vm1.sock is the socket the service manager passes as 'vm1' "
        "(port vm1): fix socket= or the socket unit"
    ]


# -- vhostd run with passed sockets --------------------------------------------------


class Activated:
    """``vhostd run ARGS`` started with ``sockets`` passed the way systemd passes them."""

    def __init__(
        self,
        args: Sequence[str],
        sockets: Sequence[tuple[str | None, socket.socket]],
        log: Path,
    ) -> None:
        # Move the sockets out of the way first, so that no redirection below
        # overwrites one that is still to be moved.
        self.high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for _, s in sockets]
        moves = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(self.high))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        env["PYTHONUNBUFFERED"] = "1"
        given = [name for name, _ in sockets]
        fdnames = f"LISTEN_FDNAMES={':'.join(n or 'unknown' for n in given)}" if any(given) else ""
        shell = f'LISTEN_PID=$$ LISTEN_FDS={len(sockets)} {fdnames} exec "$@" {moves}'
        argv = [sys.executable, "-m", "vhostd", "run", *args]
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", shell, "bash", *argv],
                pass_fds=self.high, env=env, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        for fd in self.high:
            os.close(fd)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, control: Path, timeout: float = 15.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                return fetch(str(control))
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextmanager
def activated(
    args: Sequence[str], sockets: Sequence[tuple[str | None, socket.socket]], log: Path
) -> Iterator[Activated]:
    daemon = Activated(args, sockets, log)
    try:
        yield daemon
    finally:
        daemon.stop()


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


async def serves(*paths: Path) -> None:
    """A front-end can connect and negotiate on each path."""
    for path in paths:
        async with Frontend.connect(str(path), wait=5) as fe:
            assert await fe.get_features()


def vhostd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostd", *args],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(f'control_socket = "{path.parent / "control.sock"}"\n{text}')
    return path


def test_without_a_configuration_each_passed_socket_is_a_switch_port(
    tmp_sock_dir: Path, tmp_path: Path
) -> None:
    """No --config, no --socket: the two passed sockets are ports vm1 and vm2 (the old
    daemon said "no ports"); status shows the paths they listen on."""
    if Path("/etc/vhostd/vhostd.toml").exists():
        pytest.skip("/etc/vhostd/vhostd.toml exists: vhostd run without --config reads it")
    one, two = tmp_sock_dir / "one.sock", tmp_sock_dir / "two.sock"
    control = tmp_sock_dir / "control.sock"
    socks = [("vm1", listen(one)), ("vm2", listen(two))]
    inodes = [p.stat().st_ino for p in (one, two)]
    with activated(["--control-socket", str(control)], socks, tmp_path / "log") as daemon:
        for _, sock in socks:
            sock.close()  # the daemon's now: as systemd-socket-activate, which execs it
        snap = daemon.wait_ready(control)
        ports = snap["ports"]
        assert isinstance(ports, list)
        got = [(p["name"], p["socket"], p["mode"], p["state"]) for p in ports]
        assert got == [
            ("vm1", str(one), "switch", "listening"),
            ("vm2", str(two), "switch", "listening"),
        ]
        trio.run(serves, one, two)
        human = vhostd("status", "--control-socket", str(control)).stdout
        assert "vm1   listening  switch" in human and str(one) in human, human
        assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert (
        f"port vm1: serving the socket the service manager passed ({one}) with the default "
        "settings: no configuration file" in log
    ), log
    assert [p.stat().st_ino for p in (one, two)] == inodes  # neither removed nor re-bound


def test_a_configuration_configures_what_it_names_and_the_rest_gets_defaults(
    tmp_sock_dir: Path, tmp_path: Path
) -> None:
    """[[port]] vm1 (reflect, another socket=) configures the passed vm1; [[port]] guest
    configures the socket passed as vmx by its path; vm9 has no [[port]] and is served as a
    default switch port (one log line); own.sock is bound by vhostd itself. Then reloads:
    none may unlink or re-bind a passed socket."""
    vm1, vm9, own, x = (tmp_sock_dir / f"{n}.sock" for n in ("vm1", "vm9", "own", "x"))
    control = tmp_sock_dir / "control.sock"
    cfg = tmp_sock_dir / "vhostd.toml"
    elsewhere = tmp_sock_dir / "configured-vm1.sock"
    vm1_port = f'[[port]]\nname = "vm1"\nsocket = "{elsewhere}"\nmode = "reflect"\n'
    own_port = f'[[port]]\nsocket = "{own}"\nmode = "sink"\n'
    guest_port = f'[[port]]\nname = "guest"\nsocket = "{x}"\nmode = "sink"\n'
    own_port += guest_port  # in every version of the file below
    write(cfg, vm1_port + own_port)
    socks = [("vm1", listen(vm1)), ("vm9", listen(vm9)), ("vmx", listen(x))]
    inodes = {p: p.stat().st_ino for p in (vm1, vm9, x)}

    def reload(text: str) -> subprocess.CompletedProcess[str]:
        write(cfg, text)
        return vhostd("reload", "--config", str(cfg))

    with activated(["--config", str(cfg)], socks, tmp_path / "log") as daemon:
        for _, sock in socks:
            sock.close()
        snap = daemon.wait_ready(control)
        ports = snap["ports"]
        assert isinstance(ports, list)
        assert [(p["name"], p["socket"], p["mode"]) for p in ports] == [
            ("vm1", str(vm1), "reflect"),
            ("own", str(own), "sink"),
            ("guest", str(x), "sink"),
            ("vm9", str(vm9), "switch"),
        ]
        assert not elsewhere.exists()
        trio.run(serves, vm1, vm9, own, x)

        # Without its [[port]] vm1 would be a default (switch) port: a change, refused.
        done = reload(own_port)
        assert done.returncode == 1, done
        assert "port 'vm1': changing mode would disconnect its guest" in done.stderr, done
        # Another socket= for vm1 changes nothing: the passed socket is vm1's.
        moved = f'[[port]]\nname = "vm1"\nsocket = "{tmp_sock_dir / "moved.sock"}"\n'
        done = reload(moved.replace("\n", '\nmode = "reflect"\n', 1) + own_port)
        assert done.returncode == 0 and done.stdout.endswith("reload applied: nothing changed\n")
        # A [[port]] on vm9's path configures vm9's socket, under its own name: a rename.
        grab = f'[[port]]\nname = "grab"\nsocket = "{vm9}"\n'
        done = reload(vm1_port + own_port + grab)
        assert done.returncode == 1, done
        assert f"port {vm9}: renaming port 'vm9' to 'grab' would disconnect" in done.stderr
        # With vm9 configured by name as well, 'grab' may not have its socket.
        vm9_port = '[[port]]\nname = "vm9"\nsocket = "/run/elsewhere.sock"\n'
        done = reload(vm1_port + own_port + vm9_port + grab)
        assert done.returncode == 1, done
        assert done.stderr.endswith(
            f"previous configuration kept: port grab: {vm9} is the socket the service manager "
            "passes as 'vm9' (port vm9): fix socket= or the socket unit\n"
        ), done
        human = vhostd("status", "--control-socket", str(control)).stdout
        assert "last reload: " in human and "REFUSED, previous configuration kept: port grab" in (
            human
        ), human
        # Removing a port vhostd bound itself removes its file, and only that.
        done = reload(vm1_port + guest_port)
        assert done.returncode == 0 and done.stdout.endswith("reload applied: removed port own\n")
        assert not own.exists()
        trio.run(serves, vm1, vm9, x)
        assert {p: p.stat().st_ino for p in (vm1, vm9, x)} == inodes
        assert daemon.stop() == 0, daemon.log()
    assert {p: p.stat().st_ino for p in (vm1, vm9, x)} == inodes
    assert not (tmp_sock_dir / "moved.sock").exists()
    log = daemon.log()
    assert (
        f"port vm9: serving the socket the service manager passed ({vm9}) with the default "
        f"settings: no [[port]] in {cfg} has that name or socket" in log
    ), log
    assert f"port vm1: serving the socket the service manager passed, {vm1}, not socket = " in log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("case", ["client", "tcp"])
def test_start_refused_in_one_line(tmp_sock_dir: Path, tmp_path: Path, case: str) -> None:
    cfg = write(
        tmp_sock_dir / "vhostd.toml",
        f'[[port]]\nname = "vm1"\nsocket = "{tmp_sock_dir / "q.sock"}"\nclient = true\n',
    )
    if case == "client":
        sock = listen(tmp_sock_dir / "vm1.sock")
        want = "vhostd: port vm1: client = true, but the service manager passes a listening socket"
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        want = "vhostd: socket passed by the service manager as 'vm1' (fd 3) is an AF_INET"
    with activated(["--config", str(cfg)], [("vm1", sock)], tmp_path / "log") as daemon:
        sock.close()
        assert daemon.proc.wait(30) == EX_CONFIG
    lines = daemon.log().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), lines
    assert sorted(p.name for p in tmp_sock_dir.iterdir()) == sorted(
        ["vhostd.toml", "vm1.sock"] if case == "client" else ["vhostd.toml"]
    )


def test_systemd_socket_activate_names_and_paths(tmp_sock_dir: Path, tmp_path: Path) -> None:
    """The real tool: the first connection starts vhostd with both sockets."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate missing (apt-get install systemd)")
    cfg = write(tmp_sock_dir / "vhostd.toml", "")  # no ports of its own
    a, b = tmp_sock_dir / "a.sock", tmp_sock_dir / "b.sock"
    control = tmp_sock_dir / "control.sock"
    argv = [tool, "-l", str(a), "--fdname=vm1:vm2", "-l", str(b), "--"]
    argv += [sys.executable, "-m", "vhostd", "run", "--config", str(cfg)]
    with open(tmp_path / "log", "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        trio.run(serves, b)  # this connection starts vhostd
        deadline = time.monotonic() + 15
        while not control.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        snap = fetch(str(control))
        assert [(p["name"], p["socket"]) for p in snap["ports"]] == [
            ("vm1", str(a)),
            ("vm2", str(b)),
        ]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, (tmp_path / "log").read_text()
    assert a.exists() and b.exists()


def test_status_shows_the_last_reload() -> None:
    base = {
        "pid": 7,
        "uptime_seconds": 10,
        "healthy": True,
        "ports": [],
        "switch": {
            "mac_entries": 0, "mac_table_size": 8, "forwarded": 0, "flooded": 0, "filtered": 0,
        },
        "taps": [],
    }  # fmt: skip
    assert "reload" not in format_status(base)  # a daemon without the key (older)
    never = {"count": 0, "result": None, "time": None, "error": None, "changes": []}
    assert "reload" not in format_status({**base, "reload": never})
    now = time.time()
    applied = {**never, "count": 1, "result": "applied", "time": now - 5,
               "changes": ["added port b", "log_level debug"]}  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 5))
    line = format_status({**base, "reload": applied}).splitlines()[1]
    assert line == (
        f"last reload: {stamp} (5s ago) applied: added port b, log_level debug (1 since start)"
    )
    refused = {**applied, "count": 2, "result": "refused", "changes": [], "error": "x; y"}
    line = format_status({**base, "reload": refused}).splitlines()[1]
    assert line.endswith("(5s ago) REFUSED, previous configuration kept: x; y (2 since start)")
