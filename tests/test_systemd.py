"""systemd integration: notify, watchdog, socket activation, and the unit files."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from vhostd import systemd

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    with sock:
        yield sock, {"NOTIFY_SOCKET": str(tmp_path / "notify")}


def test_notify_path_socket(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = receiver
    assert systemd.ready("2 ports\nlistening", env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 ports listening"
    assert systemd.status("reloading\r\nnow", env)
    assert sock.recv(4096) == b"STATUS=reloading now"
    assert systemd.stopping(env) and sock.recv(4096) == b"STOPPING=1"
    assert systemd.reloading(env) and sock.recv(4096) == b"RELOADING=1"
    assert systemd.watchdog_ping(env) and sock.recv(4096) == b"WATCHDOG=1"


def test_notify_abstract_socket() -> None:
    name = f"vhostd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_notify_outside_systemd(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": ""})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "@"})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    # Nobody listening: logged and False, never an exception.
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1234"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "999"}, None),  # someone else's
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env, pid=1234) == expected


def test_watchdog_interval_own_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(env) == 2.0


def test_watchdog_task_pings_at_half_the_timeout(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = receiver
    env = {**env, "WATCHDOG_USEC": "2000000"}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(systemd.watchdog_task, None, env)
            await trio.sleep(3.5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    sock.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 4  # at t = 0, 1, 2, 3


def test_watchdog_task_without_watchdog_returns() -> None:
    async def main() -> None:
        with trio.fail_after(1):
            await systemd.watchdog_task(None, {})

    trio.run(main)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    from vhostd import systemd
    before = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    fds = systemd.listen_fds()
    out = {
        "before": before,
        "after": [k for k in before if k in os.environ],
        "fds": [
            {
                "name": name,
                "fd": sock.fileno(),
                "family": int(sock.family),
                "type": int(sock.type),
                "address": sock.getsockname(),
                "inheritable": os.get_inheritable(sock.fileno()),
            }
            for name, sock in fds
        ],
    }
    if fds:
        conn, _ = fds[0][1].accept()
        conn.sendall(b"hello from " + fds[0][0].encode())
        conn.close()
    print(json.dumps(out))
    """
)

# What systemd does between fork and exec: move the sockets to 3, 4, ... and
# set LISTEN_PID to the pid that exec keeps.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    fds = [int(x) for x in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.close(fd)
    if sys.argv[2] == "own":
        os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
    """
)


def run_activated(
    tmp_path: Path, names: str | None, pid: str = "own"
) -> tuple[dict[str, object], bytes]:
    paths = [tmp_path / "vm1.sock", tmp_path / "vm2.sock"]
    listeners = []
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen()
        listeners.append(sock)
    env = {**os.environ, "LISTEN_FDS": "2", "PYTHONPATH": str(REPO)}
    env.pop("LISTEN_FDNAMES", None)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    if pid != "own":
        env["LISTEN_PID"] = pid
    fds = [s.fileno() for s in listeners]
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), pid, CHILD],
        pass_fds=fds,
        env=env,
        stdout=subprocess.PIPE,
    )
    for sock in listeners:
        sock.close()  # only the child holds them now
    greeting = b""
    if pid == "own":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(paths[0]))
            greeting = client.recv(100)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    result: dict[str, object] = json.loads(stdout)
    return result, greeting


def test_listen_fds_in_an_activated_child(tmp_path: Path) -> None:
    out, greeting = run_activated(tmp_path, "vm1:vm2")
    assert out["after"] == []  # unset, so our own children do not inherit them
    assert out["fds"] == [
        {
            "name": "vm1",
            "fd": 3,
            "family": socket.AF_UNIX,
            "type": socket.SOCK_STREAM,
            "address": str(tmp_path / "vm1.sock"),
            "inheritable": False,
        },
        {
            "name": "vm2",
            "fd": 4,
            "family": socket.AF_UNIX,
            "type": socket.SOCK_STREAM,
            "address": str(tmp_path / "vm2.sock"),
            "inheritable": False,
        },
    ]
    assert greeting == b"hello from vm1"


def test_listen_fds_without_names(tmp_path: Path) -> None:
    out, _ = run_activated(tmp_path, None)
    fds = out["fds"]
    assert isinstance(fds, list)
    assert [fd["name"] for fd in fds] == ["unknown", "unknown"]


def test_listen_fds_for_another_pid(tmp_path: Path) -> None:
    out, _ = run_activated(tmp_path, "vm1:vm2", pid="1")
    assert out["fds"] == []
    assert out["after"] == []


def test_listen_fds_env_handling() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert systemd.listen_fds(env, pid=42) == []
    assert env == {}
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "x"}
    assert systemd.listen_fds(env, pid=42, unset=False) == []
    assert env == {"LISTEN_PID": "42", "LISTEN_FDS": "x"}
    assert systemd.listen_fds({}, pid=42) == []


# --- unit files ---------------------------------------------------------------------


def require_tool(name: str) -> str:
    """The tool's path; under CI a missing tool fails instead of skipping."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package: systemd)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze")
    return subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
    )


EXEC = "/usr/local/bin/vhostd"
"""Where scripts/install-system puts vhostd, and what the units run."""


def units_in(directory: Path, exec_path: str = EXEC) -> list[Path]:
    """The service and an instance of the socket template (verify cannot take a template),
    copied to ``directory`` with ``exec_path`` for vhostd."""
    service = directory / "vhostd.service"
    service.write_text((UNITS / "vhostd.service").read_text().replace(EXEC, exec_path))
    socket_unit = directory / "vhostd@vm1.socket"
    shutil.copy(UNITS / "vhostd@.socket", socket_unit)
    return [service, socket_unit]


def test_shipped_units_verify(tmp_path: Path) -> None:
    """The shipped files, as they are: the only allowed complaint is a missing vhostd.

    tests/e2e/test_install.py verifies them as scripts/install-system installs them.
    """
    result = verify(*units_in(tmp_path))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if Path(EXEC).exists():
        assert (result.returncode, lines) == (0, [])
    else:
        # Once per command that runs it (ExecStartPre=, ExecStart=).
        assert set(lines) == {
            f"vhostd.service: Command {EXEC} is not executable: No such file or directory"
        }, lines


def test_units_verify_cleanly(tmp_path: Path) -> None:
    """With ExecStart on an existing binary, verify must print nothing at all.

    systemd-analyze exits 0 on unknown or misspelt options and only warns, so
    any output is a failure.
    """
    result = verify(*units_in(tmp_path, "/bin/true"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    service, socket_unit = units_in(tmp_path, "/bin/true")
    service.write_text(service.read_text().replace("NoNewPrivileges", "NoNewPrivilege"))
    socket_unit.write_text(socket_unit.read_text().replace("RemoveOnStop", "RemoveOnStp"))
    result = verify(service, socket_unit)
    assert "Unknown key 'NoNewPrivilege'" in result.stderr
    assert "Unknown key 'RemoveOnStp'" in result.stderr


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if re.match(r"^[A-Z]\w*=", line):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_service_settings() -> None:
    settings = {k: v[-1] for k, v in unit_settings(UNITS / "vhostd.service").items()}
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["User"] == settings["Group"] == "vhostd"
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    config = "--config /etc/vhostd/vhostd.toml"
    assert settings["ExecStart"] == f"{EXEC} run {config}"
    # "-": systemd's RestartPreventExitStatus= sees only the main process, so a failing
    # ExecStartPre would be restarted; the daemon's own exit 78 is what counts.
    assert settings["ExecStartPre"] == f"-{EXEC} check-config --syntax-only {config}"
    assert settings["ExecReload"] == f"{EXEC} reload {config}"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "78"
    assert settings["WantedBy"] == "multi-user.target"  # TAPs and metrics at boot
    assert settings["Documentation"] == "file:///usr/local/share/doc/vhostd/README.md"
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"]
    assert settings["DeviceAllow"] == "/dev/net/tun rw"


def test_socket_template_settings() -> None:
    """One socket per guest, all served by the one vhostd.service."""
    settings = {k: v[-1] for k, v in unit_settings(UNITS / "vhostd@.socket").items()}
    assert settings["ListenStream"] == "/run/vhostd/%i.sock"
    assert settings["FileDescriptorName"] == "%i"
    assert settings["Service"] == "vhostd.service"  # not vhostd@%i.service
    assert settings["WantedBy"] == "sockets.target"
    assert (settings["SocketUser"], settings["SocketGroup"]) == ("vhostd", "kvm")
    assert not (UNITS / "vhostd.socket").exists()  # the one-guest example it replaced


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """Create the user, then the runtime directory, inside a scratch root."""
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "run").mkdir()
    shutil.copy("/etc/passwd", etc / "passwd")
    shutil.copy("/etc/group", etc / "group")
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = 36  # not on this host: give the scratch root one
        with (etc / "group").open("a") as f:
            f.write(f"kvm:x:{kvm_gid}:\n")
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(UNITS / "vhostd.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    entry = [
        line for line in (etc / "passwd").read_text().splitlines() if line.startswith("vhostd:")
    ]
    assert len(entry) == 1 and entry[0].endswith(":/:/usr/sbin/nologin")
    if os.geteuid() != 0:
        pytest.skip("creating a directory owned by vhostd needs root")
    subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}", str(UNITS / "vhostd.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    info = (tmp_path / "run" / "vhostd").stat()
    assert stat.S_IMODE(info.st_mode) == 0o2750
    assert info.st_gid == kvm_gid
    assert info.st_uid == int(entry[0].split(":")[2])
