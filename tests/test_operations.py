"""Operating vhostd as an operator does: second instances, bad paths, reloads, restarts.

Each test drives ``python -m vhostd`` as a process, the way a shell or systemd would,
and checks what the operator sees (exit status, the one line on stderr, ``vhostd
reload``'s verdict) and what the guests see (a simulated front-end's traffic, which
must not stop). TAP tests run the daemon inside a network namespace the test creates
(root only), so no interface appears on the host.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon import REPO, VhostdProcess, port_config
from tests.lab.assets import find_busybox
from tests.lab.netns import Netns
from tests.vusim.frontend import Frontend
from vhostd.config import load_config
from vhostd.control import fetch
from vhostd.daemon import Daemon
from vhostd.port import Port
from vhostd.runtime import (
    EX_CONFIG,
    InstanceLock,
    SetupError,
    claim_socket_path,
    lock_holder,
    lock_path,
)
from vhostd.switch import Switch

# -- helpers -------------------------------------------------------------------------


def write_config(
    path: Path,
    ports: Sequence[tuple[str, Path | str]] = (),
    *,
    taps: Sequence[str] = (),
    mode: str = "reflect",
    extra: str = "",
    port_extra: dict[str, str] | None = None,
    log_level: str = "info",
) -> Path:
    """A configuration file whose control socket is next to it (never the system's)."""
    text = f'log_level = "{log_level}"\ncontrol_socket = "{path.parent / "control.sock"}"\n'
    text += extra
    for name, sock in ports:
        text += f'\n[[port]]\nname = "{name}"\nsocket = "{sock}"\nmode = "{mode}"\n'
        text += (port_extra or {}).get(name, "")
    for tap in taps:
        text += f'\n[[tap]]\nname = "{tap}"\n'
    path.write_text(text)
    return path


def vhostd(
    *args: str, wrapper: Sequence[str] = (), timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``vhostd ARGS`` run to completion, as from a shell."""
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "vhostd", *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip


def refused(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The one line a refused ``vhostd run`` printed; exit status EX_CONFIG, no traceback."""
    assert done.returncode == EX_CONFIG, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhostd: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(directory: Path, keep: Sequence[str] = ()) -> list[str]:
    """Files vhostd may have left in ``directory`` (sockets, lock, TAP list)."""
    return sorted(p.name for p in directory.iterdir() if p.suffix != ".toml" and p.name not in keep)


class Traffic:
    """A simulated guest on a reflect port, frame after frame, each round stamped."""

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self.stop = trio.Event()

    async def run(self, path: Path) -> None:
        async with Frontend.connect(str(path)) as fe:
            await fe.net_setup(queue_pairs=1)
            fe.post_rx(0, 64)
            for n in itertools.count():
                if self.stop.is_set():
                    return
                frame = bytes.fromhex("020000000002020000000001") + n.to_bytes(4, "big") * 16
                await fe.send_frames(1, [frame], timeout=5)
                got = await fe.recv_frames(0, timeout=5, count=1)
                assert len(got) == 1 and got[0][12:] == frame[12:], n
                self.rounds.append(time.monotonic())
                await trio.sleep(0.01)

    async def wait_rounds(self, n: int) -> None:
        with trio.fail_after(15):
            while len(self.rounds) < n:
                await trio.sleep(0.02)

    def max_gap(self, start: float, end: float) -> float:
        stamps = [start, *(t for t in self.rounds if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(stamps))


async def in_thread(*args: str, wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: vhostd(*args, wrapper=wrapper))


async def accepts(path: Path) -> None:
    """A front-end can connect and negotiate (the port serves)."""
    async with Frontend.connect(str(path), wait=5) as fe:
        assert await fe.get_features()


# -- the pieces --------------------------------------------------------------------------


def test_instance_lock_names_its_holder(tmp_sock_dir: Path) -> None:
    ctl = str(tmp_sock_dir / "control.sock")
    lock = InstanceLock.acquire(ctl)
    assert lock.path == str(tmp_sock_dir / "control.lock")
    assert Path(lock.path).read_text() == f"{os.getpid()}\n"
    assert lock_holder(ctl) == os.getpid()
    with pytest.raises(SetupError, match=rf"another vhostd \(pid {os.getpid()}\)"):
        InstanceLock.acquire(ctl)
    lock.release()
    assert not Path(lock.path).exists() and lock_holder(ctl) is None
    InstanceLock.acquire(ctl).release()
    assert lock_path("/run/vhostd/control.sock") == "/run/vhostd/control.lock"


def test_socket_paths_are_taken_over_only_when_stale(tmp_sock_dir: Path) -> None:
    stale = tmp_sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # closed without unlink: what a SIGKILLed daemon leaves
    claim_socket_path(str(stale), "port stale")
    assert not stale.exists()

    live = tmp_sock_dir / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(live))
        s.listen(1)
        with pytest.raises(SetupError, match=f"port live: a running process .* serves {live}"):
            claim_socket_path(str(live), "port live")
    assert live.exists()

    regular = tmp_sock_dir / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(SetupError, match="exists and is a regular file, not a socket"):
        claim_socket_path(str(regular), "port file")
    assert regular.read_text() == "keep me"

    with pytest.raises(SetupError, match=r"socket directory .*/nope does not exist: create it"):
        claim_socket_path(str(tmp_sock_dir / "nope" / "x.sock"), "port x")


@pytest.mark.trio
async def test_a_port_removes_only_the_socket_it_created(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "vm1.sock"
    port = Port(port_config(path), Switch())
    port.listen()
    path.unlink()
    path.write_text("someone else's")
    port.close()
    assert path.read_text() == "someone else's"

    port = Port(port_config(path := tmp_sock_dir / "vm2.sock"), Switch())
    port.listen()
    port.close()
    assert not path.exists()


def test_reload_outcome_in_snapshot_and_metrics(tmp_sock_dir: Path) -> None:
    """In-process: refused then applied reloads, as the snapshot and /metrics tell them."""
    a = tmp_sock_dir / "a.sock"
    metrics = '[metrics]\nlisten = "127.0.0.1:0"\n'
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)], extra=metrics)
    daemon = Daemon(load_config(cfg), str(cfg))

    async def scrape() -> dict[str, float]:
        def get() -> str:
            import urllib.request

            with urllib.request.urlopen(f"{daemon.metrics_url}/metrics", timeout=10) as r:
                return str(r.read().decode())

        text = await trio.to_thread.run_sync(get)
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("vhostd_reload_")
        }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            ctl = str(tmp_sock_dir / "control.sock")
            snap = await trio.to_thread.run_sync(fetch, ctl)
            assert snap["reload"] == {
                "count": 0, "result": None, "time": None, "error": None, "changes": []
            }  # fmt: skip
            first = await scrape()
            assert first["vhostd_reload_success"] == 1
            assert abs(first["vhostd_reload_timestamp_seconds"] - time.time()) < 60

            write_config(cfg, [("a", a), ("b", tmp_sock_dir / "no/b.sock")], extra=metrics)
            assert not daemon.reload()
            snap = await trio.to_thread.run_sync(fetch, ctl)
            assert snap["reload"]["result"] == "refused" and snap["reload"]["count"] == 1
            assert "port b: socket directory" in snap["reload"]["error"]
            assert (await scrape())["vhostd_reload_success"] == 0
            assert [p["name"] for p in snap["ports"]] == ["a"]

            write_config(cfg, [("a", a), ("b", tmp_sock_dir / "b.sock")], extra=metrics)
            assert daemon.reload()
            snap = await trio.to_thread.run_sync(fetch, ctl)
            assert snap["reload"]["result"] == "applied" and snap["reload"]["error"] is None
            assert snap["reload"]["changes"] == ["added port b"]
            after = await scrape()
            assert after["vhostd_reload_success"] == 1
            assert after["vhostd_reload_timestamp_seconds"] == snap["reload"]["time"]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert leftovers(tmp_sock_dir) == []


def test_a_reload_bug_costs_the_reload_not_the_daemon(
    tmp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tmp_sock_dir / "a.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)])
    daemon = Daemon(load_config(cfg), str(cfg))

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            write_config(cfg, [("a", a), ("b", tmp_sock_dir / "b.sock")])
            monkeypatch.setattr(daemon, "_prepare", broken)
            assert not daemon.reload()
            assert daemon.reload_status.error == "internal error: RuntimeError('a bug')"
            await accepts(a)
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- a second instance -----------------------------------------------------------------


def test_second_instance_refuses_and_the_first_keeps_serving(
    tmp_sock_dir: Path, tmp_path: Path
) -> None:
    """Same configuration twice, then the same socket under another control socket.

    Both refuse with one line and exit 78; the first daemon keeps its socket file (same
    inode) and its front-end's traffic never stops; a new front-end still connects.
    """
    a = tmp_sock_dir / "a.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)])
    first = VhostdProcess(["--config", str(cfg)], tmp_path / "first.log")
    traffic = Traffic()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run, a)
            await traffic.wait_rounds(10)
            assert first.proc is not None
            inode = a.stat().st_ino
            start = time.monotonic()

            again = await in_thread("run", "--config", str(cfg))
            refused(again, f"another vhostd (pid {first.proc.pid})", str(tmp_sock_dir))
            other = tmp_sock_dir / "other" / "control.sock"
            same_socket = await in_thread("run", "--socket", str(a), "--control-socket", str(other))
            refused(same_socket, f"port a: a running process (another vhostd?) already serves {a}")
            assert not other.exists()

            await trio.sleep(0.5)
            assert a.exists() and a.stat().st_ino == inode
            assert traffic.max_gap(start, time.monotonic()) < 2.0, traffic.rounds
            assert len([t for t in traffic.rounds if t >= start]) > 10
            traffic.stop.set()
        await accepts(a)  # and a new front-end is served

    with first.start(wait_for=[a, tmp_sock_dir / "control.sock"]):
        trio.run(main)
        snap = fetch(str(tmp_sock_dir / "control.sock"))
        assert snap["healthy"] and snap["pid"] == first.proc.pid  # type: ignore[union-attr]
        assert first.stop() == 0
    assert leftovers(tmp_sock_dir) == ["other"], "the first daemon left files behind"
    assert "Traceback" not in first.log(), first.log()


def test_regular_file_given_as_socket_is_untouched(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "disk.img"
    path.write_bytes(b"precious" * 1000)
    before = path.stat()
    done = vhostd("run", "--socket", str(path), "--control-socket", str(tmp_sock_dir / "c.sock"))
    refused(done, f"port disk: {path} exists and is a regular file, not a socket")
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns,
    )  # fmt: skip
    assert path.read_bytes() == b"precious" * 1000
    assert leftovers(tmp_sock_dir, keep=["disk.img"]) == []


def test_control_socket_path_is_claimed_like_a_port_socket(tmp_sock_dir: Path) -> None:
    """A stale control socket (a SIGKILLed daemon's) is replaced; a file is never touched."""
    ctl, sock = tmp_sock_dir / "c.sock", tmp_sock_dir / "a.sock"
    ctl.write_text("precious")
    done = vhostd("run", "--socket", str(sock), "--control-socket", str(ctl))
    refused(done, f"control socket: {ctl} exists and is a regular file, not a socket")
    assert ctl.read_text() == "precious"
    ctl.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(ctl))  # closed without unlink
    args = ["--socket", str(sock), "--control-socket", str(ctl)]
    daemon = VhostdProcess(args, tmp_sock_dir / "d.log")
    with daemon.start(wait_for=[sock, ctl]):
        assert fetch(str(ctl))["pid"] == daemon.proc.pid  # type: ignore[union-attr]
        assert daemon.stop() == 0
    assert "removed the stale socket" in daemon.log()


# -- start-up errors ---------------------------------------------------------------------

STARTUP_ERRORS = {
    # case: (extra lines for port "bad", socket path relative to the directory, fragments)
    "missing-directory": (
        "", "missing/bad.sock",
        ["port bad: socket directory {dir}/missing does not exist: create it or fix socket="],
    ),
    "unknown-owner": (
        'owner = "no-such-user-vhd"\n', "bad.sock",
        ["port bad: owner 'no-such-user-vhd' is not a user on this system"],
    ),
    "unknown-group": (
        'group = "no-such-group-vhd"\n', "bad.sock",
        ["port bad: group 'no-such-group-vhd' is not a group on this system"],
    ),
    "a-directory": ("", "dir.sock", ["port bad: {dir}/dir.sock exists and is a directory"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STARTUP_ERRORS))
def test_startup_errors_are_one_line_and_leave_nothing(tmp_sock_dir: Path, case: str) -> None:
    """A good port, then a bad one: one line, exit 78, and the good socket is gone too."""
    extra, rel, fragments = STARTUP_ERRORS[case]
    (tmp_sock_dir / "dir.sock").mkdir()
    cfg = write_config(
        tmp_sock_dir / "vhostd.toml",
        [("good", tmp_sock_dir / "good.sock"), ("bad", tmp_sock_dir / rel)],
        port_extra={"bad": extra},
    )
    done = vhostd("run", "--config", str(cfg))
    refused(done, *(f.format(dir=tmp_sock_dir) for f in fragments))
    assert leftovers(tmp_sock_dir, keep=["dir.sock"]) == []


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def test_group_the_daemon_may_not_use_is_one_line(tmp_sock_dir: Path, root: None) -> None:
    """As an unprivileged user, a socket for group root: refused, socket removed."""
    os.chmod(tmp_sock_dir, 0o777)
    cfg = write_config(
        tmp_sock_dir / "vhostd.toml",
        [("good", tmp_sock_dir / "good.sock"), ("vm1", tmp_sock_dir / "vm1.sock")],
        port_extra={"vm1": 'group = "root"\n'},
    )
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    done = vhostd("run", "--config", str(cfg), wrapper=nobody)
    refused(done, f"port vm1: user nobody may not give {tmp_sock_dir}/vm1.sock to group 'root'")
    assert leftovers(tmp_sock_dir) == []


# -- TAPs (root, in a network namespace) ---------------------------------------------------

HOLD_TAP = textwrap.dedent(
    """
    import fcntl, os, struct, sys, time
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x1002))
    print("holding", flush=True)
    time.sleep(120)
    """
)


def hold_tap(netns: Netns, name: str) -> subprocess.Popen[bytes]:
    """A process inside ``netns`` that keeps TAP ``name`` open (killed with the netns)."""
    proc = netns.popen([sys.executable, "-c", HOLD_TAP, name], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"holding\n"
    return proc


def link(netns: Netns, name: str) -> dict[str, Any] | None:
    """``ip -d -j link show NAME`` in the namespace (None when there is no such link)."""
    done = netns.run(["ip", "-d", "-j", "addr", "show", "dev", name], check=False)
    if done.returncode != 0:
        return None
    found: dict[str, Any] = json.loads(done.stdout)[0]
    return found


TAP_ERRORS = {
    "busy": ("tap vtap0: busy: another process has it open",),
    "not-a-tap": ("tap vtap0: an interface vtap0 exists and is not a single-queue TAP",),
    "no-cap-net-admin": (
        "tap vtap0: not permitted to create or attach it (user root lacks CAP_NET_ADMIN)",
        "ip tuntap add dev vtap0 mode tap user root",
    ),
}


@pytest.mark.parametrize("case", list(TAP_ERRORS))
def test_tap_startup_errors_are_one_line(tmp_sock_dir: Path, netns: Netns, case: str) -> None:
    """A TAP that cannot be had: one line, exit 78, no socket and no TAP left behind."""
    cfg = write_config(
        tmp_sock_dir / "vhostd.toml", [("a", tmp_sock_dir / "a.sock")], taps=["vtap1", "vtap0"]
    )
    wrapper = netns.exec_argv([])
    if case == "busy":
        netns.run(["ip", "tuntap", "add", "dev", "vtap0", "mode", "tap"])
        hold_tap(netns, "vtap0")
    elif case == "not-a-tap":
        netns.run(["ip", "link", "add", "vtap0", "type", "bridge"])
    else:
        # Without CAP_NET_ADMIN vhostd can still attach to a TAP pre-created up for anyone.
        netns.add_tap("vtap1")
        wrapper += ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    done = vhostd("run", "--config", str(cfg), wrapper=wrapper)
    refused(done, *TAP_ERRORS[case])
    assert leftovers(tmp_sock_dir) == []
    if case == "no-cap-net-admin":
        assert link(netns, "vtap1") is not None, "a TAP vhostd did not create was deleted"
    else:
        assert link(netns, "vtap1") is None, "the TAP made before the failure was not undone"


def test_bad_reloads_are_refused_while_traffic_flows(
    tmp_sock_dir: Path, tmp_path: Path, netns: Netns
) -> None:
    """A port in a missing directory; then a good port, a new TAP and one that cannot be
    opened. Each reload is refused whole (nothing it prepared stays), ``vhostd reload``
    exits 1 naming the problem, and a front-end's traffic never stops."""
    a, c = tmp_sock_dir / "a.sock", tmp_sock_dir / "c.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)])
    netns.run(["ip", "link", "add", "notap0", "type", "bridge"])
    daemon = VhostdProcess(["--config", str(cfg)], tmp_path / "vhostd.log")
    daemon.wrapper = netns.exec_argv([])
    traffic = Traffic()
    verdicts: list[subprocess.CompletedProcess[str]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run, a)
            await traffic.wait_rounds(10)
            start = time.monotonic()
            write_config(cfg, [("a", a), ("b", tmp_sock_dir / "missing" / "b.sock")])
            verdicts.append(await in_thread("reload", "--config", str(cfg)))
            write_config(cfg, [("a", a), ("c", c)], taps=["vtapnew", "notap0"])
            verdicts.append(await in_thread("reload", "--config", str(cfg)))
            assert not c.exists()
            assert await trio.to_thread.run_sync(link, netns, "vtapnew") is None
            await trio.sleep(0.5)
            end = time.monotonic()
            assert traffic.max_gap(start, end) < 2.0, traffic.rounds
            assert len([t for t in traffic.rounds if t >= start]) > 10
            traffic.stop.set()

    with daemon.start(wait_for=[a, tmp_sock_dir / "control.sock"]):
        trio.run(main)
        snap = fetch(str(tmp_sock_dir / "control.sock"))
        assert daemon.stop() == 0
    first, second = verdicts
    assert first.returncode == 1, first
    assert "reload refused, previous configuration kept: port b: socket directory" in first.stderr
    assert f"{tmp_sock_dir}/missing does not exist" in first.stderr
    assert second.returncode == 1, second
    assert "tap notap0: an interface notap0 exists and is not a single-queue TAP" in second.stderr
    assert [p["name"] for p in snap["ports"]] == ["a"] and snap["taps"] == []
    assert snap["reload"]["result"] == "refused" and snap["reload"]["count"] == 2
    assert snap["ports"][0]["connections"] == 1  # one front-end, never disconnected
    log = daemon.log()
    assert log.count("reload refused:") == 2 and "Traceback" not in log, log
    assert leftovers(tmp_sock_dir) == []


def test_good_reload_adds_a_port_and_changes_log_level(tmp_sock_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_sock_dir / "a.sock", tmp_sock_dir / "b.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)])
    daemon = VhostdProcess(["--config", str(cfg)], tmp_path / "vhostd.log")
    with daemon.start(wait_for=[a, tmp_sock_dir / "control.sock"]):
        assert daemon.proc is not None
        unchanged = vhostd("reload", "--config", str(cfg))
        assert unchanged.returncode == 0, unchanged
        assert (
            unchanged.stdout == f"vhostd pid {daemon.proc.pid}: reload applied: nothing changed\n"
        )

        write_config(cfg, [("a", a), ("b", b)], log_level="debug")
        done = vhostd("reload", "--config", str(cfg))
        assert done.returncode == 0, done
        assert done.stdout == (
            f"vhostd pid {daemon.proc.pid}: reload applied: added port b, log_level debug\n"
        )
        trio.run(accepts, b)
        snap = fetch(str(tmp_sock_dir / "control.sock"))
        assert [p["name"] for p in snap["ports"]] == ["a", "b"]
        assert snap["reload"]["changes"] == ["added port b", "log_level debug"]
        assert daemon.stop() == 0
    log = daemon.log()
    before, after = log.split("reload applied: added port b")
    assert " DEBUG " not in before and "DEBUG vhostd.session: b: <- GET_FEATURES" in after, log
    assert leftovers(tmp_sock_dir) == []


def test_reload_without_a_daemon_says_so(tmp_sock_dir: Path) -> None:
    done = vhostd("reload", "--control-socket", str(tmp_sock_dir / "control.sock"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"vhostd: no vhostd answers on {tmp_sock_dir}/control.sock")


# -- TAPs across restarts and reloads -----------------------------------------------------


def test_restart_reattaches_to_the_same_tap(
    tmp_sock_dir: Path, tmp_path: Path, netns: Netns
) -> None:
    """vhostd creates vtap0; the host gives it an address and a bridge; vhostd restarts.

    The interface survives the stop (persistent) and the new daemon attaches to it: same
    MAC, address and bridge, and the host's frames reach a guest again. A pre-created
    TAP dropped by a reload stays; the one vhostd created is deleted once the
    configuration drops it (at the next start).
    """
    a = tmp_sock_dir / "a.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)], taps=["vtap0"], mode="switch")
    netns.run(["ip", "link", "add", "br0", "type", "bridge"])
    netns.run(["ip", "tuntap", "add", "dev", "pretap", "mode", "tap"])
    wrapper = netns.exec_argv([])

    def start(n: int) -> VhostdProcess:
        proc = VhostdProcess(["--config", str(cfg)], tmp_path / f"vhostd{n}.log", wrapper=wrapper)
        return proc.start(wait_for=[a, tmp_sock_dir / "control.sock"])

    async def host_frames_reach_the_guest(mac: str) -> None:
        """The host's ARP requests for a neighbour go out of vtap0, the switch floods them."""
        async with Frontend.connect(str(a)) as fe:
            await fe.net_setup(queue_pairs=1)
            fe.post_rx(0, 64)
            ping = [str(find_busybox()), "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.9.0.2"]
            await trio.to_thread.run_sync(lambda: netns.run(ping, check=False))
            src = bytes.fromhex(mac.replace(":", ""))
            seen: list[bytes] = []
            with trio.fail_after(10):
                while not any(f[6:12] == src and f[12:14] == b"\x08\x06" for f in seen):
                    seen += await fe.recv_frames(0, timeout=1)

    with start(1) as first:
        created = link(netns, "vtap0")
        assert created is not None and created["linkinfo"]["info_data"]["type"] == "tap"
        netns.run(["ip", "addr", "add", "10.9.0.1/24", "dev", "vtap0"])
        netns.run(["ip", "link", "set", "vtap0", "master", "br0"])
        trio.run(host_frames_reach_the_guest, created["address"])
        assert first.stop() == 0
    kept = link(netns, "vtap0")
    assert kept is not None, "stopping vhostd destroyed its TAP"
    assert kept["master"] == "br0" and "10.9.0.1" in [i["local"] for i in kept["addr_info"]]

    with start(2) as second:
        again = link(netns, "vtap0")
        assert again is not None
        assert again["address"] == created["address"], (created, again)
        assert again["master"] == "br0" and "10.9.0.1" in [i["local"] for i in again["addr_info"]]
        trio.run(host_frames_reach_the_guest, again["address"])
        assert "tap vtap0: up (attached)" in second.log()

        write_config(cfg, [("a", a)], taps=["vtap0", "pretap"], mode="switch")
        done = vhostd("reload", "--config", str(cfg))
        assert done.returncode == 0 and "added tap pretap\n" in done.stdout, done
        write_config(cfg, [("a", a)], taps=["vtap0"], mode="switch")
        done = vhostd("reload", "--config", str(cfg))
        assert done.returncode == 0 and done.stdout.endswith("removed tap pretap\n"), done
        assert link(netns, "pretap") is not None, "a TAP vhostd did not create was deleted"
        assert second.stop() == 0

    write_config(cfg, [("a", a)], mode="switch")  # vtap0 leaves the configuration
    with start(3) as third:
        assert link(netns, "vtap0") is None, "vhostd's own TAP outlived its configuration"
        assert third.stop() == 0
    assert "tap vtap0: deleted (vhostd created it; no longer configured)" in third.log()
    assert leftovers(tmp_sock_dir) == []


def test_reload_adds_and_deletes_its_own_tap(
    tmp_sock_dir: Path, tmp_path: Path, netns: Netns
) -> None:
    a = tmp_sock_dir / "a.sock"
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", a)])
    daemon = VhostdProcess(["--config", str(cfg)], tmp_path / "vhostd.log")
    daemon.wrapper = netns.exec_argv([])
    with daemon.start(wait_for=[a, tmp_sock_dir / "control.sock"]):
        write_config(cfg, [("a", a)], taps=["vtap9"])
        done = vhostd("reload", "--config", str(cfg))
        assert done.returncode == 0 and done.stdout.endswith("added tap vtap9 (created)\n"), done
        assert link(netns, "vtap9") is not None
        assert (tmp_sock_dir / "control.taps").read_text() == "vtap9\n"
        write_config(cfg, [("a", a)])
        done = vhostd("reload", "--config", str(cfg))
        assert done.returncode == 0 and done.stdout.endswith("removed tap vtap9 (deleted)\n")
        assert link(netns, "vtap9") is None
        assert daemon.stop() == 0
    assert leftovers(tmp_sock_dir) == []


# -- check-config against the system --------------------------------------------------------


def test_check_config_checks_the_system(tmp_sock_dir: Path) -> None:
    """Directories, users and groups, the control socket path, the metrics port."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    (tmp_sock_dir / "control.sock").write_text("not a socket")
    cfg = write_config(
        tmp_sock_dir / "vhostd.toml",
        [("a", tmp_sock_dir / "missing" / "a.sock"), ("b", tmp_sock_dir / "b.sock")],
        extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
        port_extra={"b": 'owner = "no-such-user-vhd"\ngroup = "no-such-group-vhd"\n'},
    )
    with busy:
        done = vhostd("check-config", str(cfg))
    name = str(cfg)
    assert done.returncode == 1, done
    assert done.stdout.splitlines() == [
        f"{name}:2: control_socket: {tmp_sock_dir}/control.sock exists and is a regular file, "
        "not a socket (vhostd never removes it): move it away or fix control_socket=",
        f"{name}:4: metrics.listen: 127.0.0.1:{port} is in use by another process: fix listen=",
        f"{name}:8: port[0].socket: directory {tmp_sock_dir}/missing does not exist: create "
        "it or fix socket=",
        f"{name}:15: port[1].owner: 'no-such-user-vhd' is not a user on this system",
        f"{name}:16: port[1].group: 'no-such-group-vhd' is not a group on this system",
    ], done.stdout
    syntax = vhostd("check-config", "--syntax-only", str(cfg))
    assert syntax.returncode == 0 and syntax.stdout == f"{name}: OK\n", syntax


def test_check_config_while_the_daemon_runs(tmp_sock_dir: Path, tmp_path: Path) -> None:
    """What the running daemon holds counts as free; a new port's problems still show."""
    a = tmp_sock_dir / "a.sock"
    cfg = write_config(
        tmp_sock_dir / "vhostd.toml", [("a", a)], extra='[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    with VhostdProcess(["--config", str(cfg)], tmp_path / "vhostd.log") as daemon:
        daemon.start(wait_for=[a, tmp_sock_dir / "control.sock"])
        assert daemon.proc is not None
        done = vhostd("check-config", str(cfg))
        assert done.returncode == 0, done
        assert f"note: vhostd pid {daemon.proc.pid} runs with control socket" in done.stdout
        write_config(cfg, [("a", a), ("b", tmp_sock_dir / "x" / "b.sock")])
        done = vhostd("check-config", str(cfg))
        assert done.returncode == 1 and "port[1].socket: directory" in done.stdout, done


def test_check_config_tap_checks(tmp_sock_dir: Path, netns: Netns) -> None:
    """In a namespace, without CAP_NET_ADMIN: what check-config says of each TAP."""
    netns.add_tap("pretap")  # up, no owner: anyone may attach
    netns.run(["ip", "tuntap", "add", "dev", "downtap", "mode", "tap"])  # not up
    netns.run(["ip", "tuntap", "add", "dev", "busytap", "mode", "tap"])
    netns.run(["ip", "link", "set", "busytap", "up"])
    hold_tap(netns, "busytap")
    netns.run(["ip", "link", "add", "br0", "type", "bridge"])
    taps = ["pretap", "downtap", "busytap", "br0", "newtap"]
    cfg = write_config(tmp_sock_dir / "vhostd.toml", [("a", tmp_sock_dir / "a.sock")], taps=taps)
    no_cap = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    done = vhostd("check-config", str(cfg), wrapper=netns.exec_argv(no_cap))
    assert done.returncode == 1, done
    name = str(cfg)
    assert done.stdout.splitlines() == [
        f"{name}:13: tap[1].name: without CAP_NET_ADMIN vhostd cannot configure TAP downtap: "
        "do it beforehand (ip link set downtap up)",
        f"{name}:16: tap[2].name: TAP busytap is busy: another process has it open (its carrier "
        "is up): stop it or fix name=",
        f"{name}:19: tap[3].name: an interface br0 exists and is not a TAP (ip -d link show "
        "br0): remove it or fix name=",
        f"{name}:22: tap[4].name: user root lacks CAP_NET_ADMIN, so it cannot create TAP "
        "newtap: grant CAP_NET_ADMIN, or pre-create the TAP for it: ip tuntap add dev newtap "
        "mode tap user root",
    ], done.stdout
    with_cap = vhostd("check-config", str(cfg), wrapper=netns.exec_argv([]))
    assert with_cap.returncode == 1 and len(with_cap.stdout.splitlines()) == 2, with_cap
