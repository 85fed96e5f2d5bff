"""vhostd as a systemd service: socket activation, notify/watchdog, restart, reload.

What systemd does is reproduced without systemd: `systemd-socket-activate` (or a
listening socket this test holds, as `vhostd@vm1.socket` would) hands the port's socket
to the daemon as fd 3 with LISTEN_FDS/LISTEN_FDNAMES, and a datagram socket bound by
the test plays the service manager's NOTIFY_SOCKET. The guest's peer is a TAP in a
network namespace plugged into vhostd's switch, so a continuous ping from the
namespace, time-stamped by the test as each reply arrives, measures outages exactly.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.daemon import REPO, VhostdProcess
from tests.lab.assets import GuestImage, find_busybox
from tests.lab.fixtures import require_binary
from tests.lab.netns import Netns
from tests.lab.process import stop_process
from tests.lab.qemu import Guest, GuestConfig
from tests.vusim.frontend import Frontend

GUEST_IP = "10.0.0.1"
TAP_IP = "10.0.0.2"
TAP = "vtap0"
WATCHDOG_USEC = 2_000_000


# -- the service manager's side ------------------------------------------------


@dataclass(slots=True)
class Notice:
    at: float  # time.monotonic() when received
    fields: dict[str, str]


class NotifyReceiver:
    """The NOTIFY_SOCKET: a datagram socket the daemon's sd_notify messages arrive on.

    A thread reads it continuously so each notice is stamped when it arrives (the
    watchdog check measures the daemon's intervals, not the test's).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.notices: list[Notice] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            with self._cond:
                self.notices.append(Notice(time.monotonic(), fields))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.notices)

    def wait_for(self, key: str, value: str = "1", timeout: float = 30.0, after: int = 0) -> Notice:
        """The first notice (from index `after` on) that sets `key` to `value`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for notice in self.notices[after:]:
                    if notice.fields.get(key) == value:
                        return notice
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} within {timeout:.0f}s: {self.notices}")
                self._cond.wait(left)

    def times(self, key: str, after: int = 0) -> list[float]:
        with self._cond:
            return [n.at for n in self.notices[after:] if key in n.fields]

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_sock_dir: Path) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(tmp_sock_dir / "notify")
    try:
        yield receiver
    finally:
        receiver.close()


def service_env(notify: NotifyReceiver, **extra: str) -> dict[str, str]:
    """The environment systemd gives the service (no stray LISTEN_*/NOTIFY_* of ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    env.update(NOTIFY_SOCKET=str(notify.path), PYTHONUNBUFFERED="1", **extra)
    return env


def vhostd_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "vhostd", "run", "--config", str(config)]


def write_config(
    path: Path, ports: Sequence[tuple[str, Path, str]], taps: Sequence[str] = ()
) -> Path:
    # Never the default /run/vhostd/control.sock: other daemons may be running.
    text = f'log_level = "debug"\ncontrol_socket = "{path.parent / "control.sock"}"\n'
    for name, sock, mode in ports:
        text += f'\n[[port]]\nname = "{name}"\nsocket = "{sock}"\nmode = "{mode}"\n'
    for tap in taps:
        text += f'\n[[tap]]\nname = "{tap}"\n'
    path.write_text(text)
    return path


class ServiceProcess:
    """vhostd started the way systemd starts (and restarts) its service.

    With `listener` this is `vhostd@vm1.socket`: the test holds the listening socket
    (systemd's job), so the socket, and connections queued on it, outlive every
    daemon process. LISTEN_PID must be the daemon's own PID: bash sets it to `$$`
    and then execs the daemon in its place. Without, vhostd binds the path itself.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        log: Path,
        listener: socket.socket | None = None,
        name: str = "",
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.log_path = log
        self.listener = listener
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wrapper: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None
        argv = [*wrapper, *self.argv]
        fds: tuple[int, ...] = ()
        if self.listener is not None:
            fd = self.listener.fileno()
            fds = (fd,)
            # bash: dash cannot redirect from a two-digit fd.
            shell = (
                f'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={self.name} exec "$@" 3<&{fd} {fd}<&-'
            )
            argv = [*wrapper, "bash", "-c", shell, "bash", *self.argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self.proc

    def stop(self, timeout: float = 10.0) -> int | None:
        return None if self.proc is None else stop_process(self.proc, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- the measuring peer ----------------------------------------------------------


@dataclass
class Ping:
    """A continuous busybox ping from the namespace; each reply stamped on arrival."""

    proc: subprocess.Popen[bytes]
    replies: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, seq)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if "bytes from" in line and "seq=" in line:
                seq = int(line.split("seq=")[1].split()[0])
                with self.lock:
                    self.replies.append((time.monotonic(), seq))

    def since(self, t: float) -> list[tuple[float, int]]:
        with self.lock:
            return [r for r in self.replies if r[0] >= t]

    def wait_reply_after(self, t: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(t)
            if got:
                return got[0][0]
            time.sleep(0.05)
        raise AssertionError(f"no ping reply within {timeout:.0f}s after t={t:.1f}")

    def max_gap(self, start: float, end: float) -> float:
        """The longest time without a reply in [start, end]."""
        stamps = [start] + [t for t, _ in self.since(start) if t <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(stamps))


@contextmanager
def continuous_ping(netns: Netns, address: str, interval: float = 0.2) -> Iterator[Ping]:
    argv = [str(find_busybox()), "ping", "-i", str(interval), "-W", "1", address]
    proc = subprocess.Popen(
        netns.exec_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    ping = Ping(proc)
    reader = threading.Thread(target=ping._read, daemon=True)
    reader.start()
    try:
        yield ping
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)


def guest_config(sock: Path, timeout: int = 150, **kw: object) -> GuestConfig:
    return GuestConfig(
        socket=sock, role="idle", ip=f"{GUEST_IP}/24", peer=TAP_IP,
        params={"timeout": timeout}, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def reachable(netns: Netns, guest: Guest, timeout: float = 90.0) -> None:
    guest.wait_for(r"VHOSTD-READY", timeout=timeout)
    netns.wait_reachable(GUEST_IP, timeout=60)


# -- 1. socket activation, readiness and the watchdog ------------------------------


@pytest.mark.e2e
def test_socket_activated_daemon_serves_a_guest_and_talks_to_systemd(
    guest_image: GuestImage,
    tmp_sock_dir: Path,
    lab_logs: Path,
    netns: Netns,
    notify_socket: NotifyReceiver,
) -> None:
    """systemd-socket-activate passes vm1's socket; QEMU's connection starts the daemon.

    The daemon reports READY=1, pings the watchdog more often than WATCHDOG_USEC,
    carries the guest's traffic on the inherited socket, says STOPPING=1 on SIGTERM
    and leaves the socket file to its owner.
    """
    require_binary("systemd-socket-activate", "systemd")
    sock = tmp_sock_dir / "vm1.sock"
    config = write_config(tmp_sock_dir / "vhostd.toml", [("vm1", sock, "switch")], [TAP])
    netns.add_tap(TAP, f"{TAP_IP}/24")
    env = service_env(notify_socket)
    activate = [
        "systemd-socket-activate", "-l", str(sock), "--fdname=vm1",
        "-E", f"NOTIFY_SOCKET={notify_socket.path}", "-E", f"WATCHDOG_USEC={WATCHDOG_USEC}",
        "-E", "PYTHONUNBUFFERED=1", "-E", f"PATH={os.environ.get('PATH', '')}",
    ]  # fmt: skip
    # systemd-socket-activate must not report READY itself: only the daemon may.
    env.pop("NOTIFY_SOCKET")
    log_path = lab_logs / "vhostd.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            netns.exec_argv([*activate, *vhostd_argv(config)]),
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate made no socket"
            time.sleep(0.05)
        inode = sock.stat().st_ino
        with Guest(guest_image, guest_config(sock), lab_logs, "activated") as guest:
            ready = notify_socket.wait_for("READY", timeout=60)
            reachable(netns, guest)
            with continuous_ping(netns, GUEST_IP) as ping:
                t0 = time.monotonic()
                time.sleep(4.0)
                t1 = time.monotonic()
                assert len(ping.since(t0)) >= 10, ping.replies
                assert ping.max_gap(t0, t1) < 2.5, [(round(t - t0, 2), n) for t, n in ping.replies]
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(15) == 0, log_path.read_text()
            stopping = notify_socket.wait_for("STOPPING", timeout=5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    vhostd_log = log_path.read_text(errors="replace")
    assert "vm1: front-end connected" in vhostd_log, vhostd_log
    assert ready.fields.get("STATUS") == "serving 1 port(s)"
    pings = [t for t in notify_socket.times("WATCHDOG") if ready.at - 1 <= t <= stopping.at]
    assert len(pings) >= 5, notify_socket.notices
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # systemd would have killed us otherwise
    # Still the file systemd-socket-activate bound: vhostd neither removed nor re-bound it.
    assert sock.exists() and sock.stat().st_ino == inode, "vhostd touched systemd's socket file"


# -- 2. restart under a running guest ------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("socket_owner", ["systemd", "vhostd"])
def test_restart_keeps_the_guest(
    guest_image: GuestImage,
    tmp_sock_dir: Path,
    lab_logs: Path,
    netns: Netns,
    notify_socket: NotifyReceiver,
    socket_owner: str,
) -> None:
    """SIGTERM and start again on the same socket path: pings resume within 5 s.

    QEMU (reconnect=1) re-sends the whole setup to the new daemon, with the rings'
    bases; the guest never notices more than a short loss. The socket is either
    held across restarts (vhostd@vm1.socket) or removed and bound again by vhostd.
    """
    sock = tmp_sock_dir / "vm1.sock"
    config = write_config(tmp_sock_dir / "vhostd.toml", [("vm1", sock, "switch")], [TAP])
    netns.add_tap(TAP, f"{TAP_IP}/24")
    listener = None
    if socket_owner == "systemd":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock))
        listener.listen(8)
    env = service_env(notify_socket)
    daemon = ServiceProcess(vhostd_argv(config), env, lab_logs / "vhostd.log", listener, "vm1")
    ns_wrapper = netns.exec_argv([])
    outages: list[float] = []
    try:
        daemon.start(ns_wrapper)
        notify_socket.wait_for("READY", timeout=30)
        guest_cfg = guest_config(sock, reconnect=1)
        with Guest(guest_image, guest_cfg, lab_logs, "restart") as guest:
            reachable(netns, guest)
            with continuous_ping(netns, GUEST_IP) as ping:
                before = time.monotonic()
                ping.wait_reply_after(before, 10)
                for round_ in range(2):
                    mark = notify_socket.mark()
                    assert daemon.stop() == 0, daemon.log()
                    stopped = notify_socket.wait_for("STOPPING", timeout=5, after=mark).at
                    time.sleep(1.5)  # stay down long enough for QEMU to notice and reconnect
                    down = time.monotonic()
                    # Nothing answers while vhostd is down: the measurement below is real.
                    assert not [r for r in ping.since(stopped + 0.5) if r[0] < down], round_
                    daemon.start(ns_wrapper)
                    notify_socket.wait_for("READY", timeout=30, after=mark)
                    back = ping.wait_reply_after(down, 30)
                    outages.append(back - down)
                    assert back - down < 5.0, (round_, back - down, daemon.log()[-3000:])
                    time.sleep(3.0)  # and it stays back: most of ~15 pings answered
                    assert len(ping.since(back)) >= 8, (round_, ping.replies)
            assert guest.running(), guest.serial()
            assert guest.serial().count("VHOSTD-BOOT") == 1, guest.serial()
        assert daemon.stop() == 0
        # Only a socket vhostd bound itself is vhostd's to remove.
        assert sock.exists() == (socket_owner == "systemd")
    finally:
        daemon.stop()
        if listener is not None:
            listener.close()
    print(f"ping back {', '.join(f'{o:.2f}' for o in outages)} s after each restart")
    log = daemon.log()
    assert log.count("vm1: front-end connected") == 3, log
    assert "session failed" not in log and "stopped:" not in log, log


# -- 3. reload ------------------------------------------------------------------------


def test_sighup_adds_and_removes_ports_without_touching_a_running_one(
    tmp_sock_dir: Path,
    lab_logs: Path,
    notify_socket: NotifyReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Port a reflects a simulated guest's frames continuously while b comes and goes."""
    a, b, c = (tmp_sock_dir / f"{n}.sock" for n in "abc")
    cfg = tmp_sock_dir / "vhostd.toml"
    write_config(cfg, [("a", a, "reflect")])
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))  # VhostdProcess passes os.environ
    # A command-line override must survive reloads (the file names another control socket).
    args = ["--config", str(cfg), "--control-socket", str(tmp_sock_dir / "cli-control.sock")]
    proc = VhostdProcess(args, lab_logs / "vhostd.log")

    def reload(ports: list[tuple[str, Path, str]]) -> None:
        write_config(cfg, ports)
        mark = notify_socket.mark()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING", timeout=10, after=mark)
        notify_socket.wait_for("READY", timeout=10, after=mark)

    async def accepts(path: Path) -> None:
        async with Frontend.connect(str(path), wait=5) as fe:
            assert await fe.get_features()

    rounds: list[float] = []

    async def traffic(stop: trio.Event) -> None:
        async with Frontend.connect(str(a)) as fe:
            await fe.net_setup(queue_pairs=1)
            fe.post_rx(0, 64)
            n = 0
            while not stop.is_set():
                frames = [bytes.fromhex("020000000002020000000001") + n.to_bytes(4, "big") * 16]
                await fe.send_frames(1, frames, timeout=5)
                got = await fe.recv_frames(0, timeout=5, count=1)
                assert len(got) == 1 and got[0][-64:] == frames[0][-64:], n
                rounds.append(time.monotonic())
                n += 1
                await trio.sleep(0.01)

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, stop)
            while len(rounds) < 20:
                await trio.sleep(0.05)
            await trio.to_thread.run_sync(reload, [("a", a, "reflect"), ("b", b, "sink")])
            assert b.exists()
            await accepts(b)
            # Refused: a's mode may not change while its guest runs, so c must not appear.
            await trio.to_thread.run_sync(
                reload, [("a", a, "sink"), ("b", b, "sink"), ("c", c, "sink")]
            )
            assert not c.exists()
            await trio.to_thread.run_sync(reload, [("a", a, "reflect")])
            assert not b.exists()
            before = len(rounds)
            await trio.sleep(0.5)
            assert len(rounds) > before, "port a stopped passing traffic"
            stop.set()

    with proc.start(wait_for=[a]):
        notify_socket.wait_for("READY", timeout=15)
        start = time.monotonic()
        trio.run(main)
        end = time.monotonic()
        log = proc.log()
    assert "reload refused: port 'a': changing mode would disconnect its guest" in log, log
    assert "reload: adding port b" in log and "reload: removing port b" in log, log
    assert "reload: adding port c" not in log, log
    assert log.count("reload refused") == 1, log
    assert log.count("a: front-end connected") == 1, log
    stamps = [start, *rounds, end]
    assert max(y - x for x, y in itertools.pairwise(stamps)) < 1.0


# -- check-config -----------------------------------------------------------------


def check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostd", "check-config", *extra, str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )  # fmt: skip


BROKEN_CONFIGS = {
    "typo.toml": (
        '[[port]]\nsocket = "/run/vhostd/a.sock"\nmoed = "switch"\n',
        ["typo.toml:3: port[0].moed: unknown key 'moed'; did you mean 'mode'?"],
    ),
    "values.toml": (
        'log_level = "loud"\n\n[[port]]\nsocket = "relative.sock"\nmtu = 20\n',
        [
            "values.toml:1: log_level: must be one of",
            "values.toml:4: port[0].socket: must be an absolute path",
            "values.toml:5: port[0].mtu: must be between 68 and 65535",
        ],
    ),
    "duplicate.toml": (
        '[[port]]\nname = "vm1"\nsocket = "/run/a.sock"\n\n'
        '[[port]]\nname = "vm1"\nsocket = "/run/b.sock"\n',
        ["duplicate.toml:6: port[1].name: duplicate port name 'vm1'"],
    ),
    "syntax.toml": (
        '[[port]]\nsocket = "/run/vhostd/a.sock\n',
        ["syntax.toml:2: TOML syntax error"],
    ),
}


def test_check_config_cli(tmp_path: Path) -> None:
    """Every problem of a broken file is printed as FILE:LINE: key: message, exit status 1."""
    for name, (text, wanted) in BROKEN_CONFIGS.items():
        path = tmp_path / name
        path.write_text(text)
        done = check_config(path)
        assert done.returncode == 1, (name, done)
        lines = done.stdout.splitlines()
        assert len(lines) == len(wanted), (name, done.stdout)
        for line, want in zip(lines, wanted, strict=True):
            assert line.startswith(f"{tmp_path}/{want}"), (name, line, want)
    # The file alone: this machine need not have /run/vhostd (test_operations checks the system).
    done = check_config(REPO / "systemd" / "vhostd.toml.example", "--syntax-only")
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done
    missing = check_config(tmp_path / "absent.toml")
    assert missing.returncode == 2 and "absent.toml" in missing.stderr, missing
