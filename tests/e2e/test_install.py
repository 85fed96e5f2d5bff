"""The README's install steps, run for real in a throwaway copy of this machine's root.

This machine (like CI's) is a container without systemd as PID 1, and what the
install writes (/opt/vhostd, /usr/local, /etc/vhostd, a user in /etc/passwd,
/run/vhostd) must not stay on it. So the steps run in a private mount namespace
whose root is an overlay of the real one (the writes land in a tmpfs that vanishes
with the namespace), with the checkout bound in read-only (the install must not
touch it). Then what systemd would do with the installed units is done by hand:
``systemd-analyze verify`` on them, and their ``ExecStartPre=``, ``ExecStart=`` and
``ExecReload=`` command lines run the way the service runs them (user vhostd,
CAP_NET_ADMIN as its only capability, umask 0077, NOTIFY_SOCKET and WATCHDOG_USEC,
in a network namespace of their own so the example configuration's TAP and metrics
port stay private), with the installed example configuration.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from tests.daemon import REPO
from tests.e2e.test_service import NotifyReceiver
from tests.lab.fixtures import require, require_binary

pytestmark = pytest.mark.e2e

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_DIR = "/usr/local/lib/systemd/system"
MARKER = "<!-- tests/e2e/test_install.py runs this block"

# $1: an empty directory to build the copy in; $2: a host directory to share
# (/mnt/host inside); $3: the checkout, bound read-only at the same path.
SETUP = r"""
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs "$1"
mkdir "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"
for d in proc sys dev; do mount --rbind "/$d" "$1/root/$d"; done
mount -t tmpfs -o mode=0755 tmpfs "$1/root/run"
mount -t tmpfs -o mode=1777 tmpfs "$1/root/tmp"
mkdir -p "$1/root/mnt/host" "$1/root$3"
mount --bind "$2" "$1/root/mnt/host"
mount --bind "$3" "$1/root$3"
mount -o remount,bind,ro "$1/root$3"
echo ready
exec sleep infinity
"""

# What systemd does for User=vhostd, AmbientCapabilities=/CapabilityBoundingSet=
# CAP_NET_ADMIN, NoNewPrivileges=yes, UMask=0077; $$ is the PID the daemon keeps (every
# step execs), as WATCHDOG_PID must be.
AS_SERVICE = (
    "umask 0077 && exec setpriv --reuid=vhostd --regid=vhostd --init-groups "
    "--inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin "
    "--bounding-set=-all,+net_admin --no-new-privs "
    "env -i PATH=/usr/bin:/bin HOME=/ USER=vhostd LOGNAME=vhostd LANG=C.UTF-8 "
    "NOTIFY_SOCKET=/mnt/host/notify WATCHDOG_USEC=30000000 WATCHDOG_PID=$$ "
    # and, under socket activation, what says which fds are sockets
    "${LISTEN_PID:+LISTEN_PID=$LISTEN_PID} ${LISTEN_FDS:+LISTEN_FDS=$LISTEN_FDS} "
    '${LISTEN_FDNAMES:+LISTEN_FDNAMES=$LISTEN_FDNAMES} "$@"'
)

NO_NOW = """systemctl() {
    local args=() arg
    for arg in "$@"; do [ "$arg" = --now ] || args+=("$arg"); done
    command systemctl "${args[@]}"
}"""

# A vhost-user front-end's first question: GET_FEATURES (request 1, version 1).
GET_FEATURES = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(struct.pack("<III", 1, 1, 0))
data = b""
while len(data) < 20:
    chunk = s.recv(20 - len(data))
    if not chunk:
        break
    data += chunk
request, flags, size = struct.unpack_from("<III", data)
print(request, hex(flags), size, hex(struct.unpack_from("<Q", data, 12)[0]))
"""


class Sandbox:
    """A private mount namespace whose / (seen through chroot) is a writable overlay of
    the real one; commands run inside with a clean root environment."""

    def __init__(self, top: Path, share: Path) -> None:
        self.top = top
        self.root = top / "root"  # only inside the namespace
        self.holder = subprocess.Popen(
            ["unshare", "-m", "bash", "-c", SETUP, "setup", str(top), str(share), str(REPO)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.close()
            pytest.fail(f"cannot set up the overlay: {line}{self.holder.stdout.read()}")

    def argv(self, argv: Sequence[str]) -> list[str]:
        nsenter = ["nsenter", "-t", str(self.holder.pid), "-m", "chroot", str(self.root)]
        return [*nsenter, "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", *argv]

    def run(self, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(["bash", "-c", script]), capture_output=True, text=True, timeout=timeout
        )

    def out(self, script: str) -> str:
        done = self.run(script)
        assert done.returncode == 0, (script, done)
        return done.stdout

    def popen(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.terminate()
        self.holder.wait(30)
        assert self.holder.stdout is not None
        self.holder.stdout.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@pytest.fixture
def sandbox() -> Iterator[tuple[Sandbox, Path]]:
    require("root", os.geteuid() == 0, "run as root (mount namespaces, setpriv, TAPs)")
    for tool in ("unshare", "nsenter", "setpriv"):
        require_binary(tool, "util-linux")
    for tool in ("systemd-analyze", "systemd-socket-activate", "systemd-sysusers"):
        require_binary(tool, "systemd")
    top = Path(tempfile.mkdtemp(prefix="vhd-root-", dir="/tmp"))
    share = Path(tempfile.mkdtemp(prefix="vhd-share-", dir="/tmp"))
    share.chmod(0o755)  # the daemon's user reaches the notify socket through it
    try:
        with Sandbox(top, share) as box:
            yield box, share
    finally:
        top.rmdir()  # only the mount point: everything was in the namespace's tmpfs
        shutil.rmtree(share, ignore_errors=True)


def readme_steps() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER) :]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match is not None
    return match.group(1)


def unit_settings(text: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in text.splitlines():
        if re.match(r"^[A-Z]\w*=", line):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def command(value: str) -> list[str]:
    """An Exec*= line's argv, without systemd's prefixes ("-" ignores a failure)."""
    return shlex.split(value.lstrip("-@:+!"))


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_readme_install_steps_give_a_working_service(
    sandbox: tuple[Sandbox, Path], lab_logs: Path
) -> None:
    box, share = sandbox
    steps = readme_steps()
    assert "scripts/install-system" in steps and "systemctl enable" in steps, steps
    # No systemd runs here to start anything: systemctl gets the block's arguments but
    # --now, so it links the units; the starting is done below, by hand.
    script = f"set -e\n{NO_NOW}\ncd {shlex.quote(str(REPO))}\n{steps}"
    done = box.run(script, timeout=900)
    (lab_logs / "install.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    # What the install left, and what `systemctl enable` linked.
    assert box.out("readlink -f /usr/local/bin/vhostd") == "/opt/vhostd/bin/vhostd\n"
    wants = "/etc/systemd/system/{}.wants/{}"
    assert box.out(f"readlink {wants.format('multi-user.target', 'vhostd.service')}") == (
        f"{UNIT_DIR}/vhostd.service\n"
    )
    assert box.out(f"readlink {wants.format('sockets.target', 'vhostd@vm1.socket')}") == (
        f"{UNIT_DIR}/vhostd@.socket\n"
    )
    assert box.out("stat -c '%U %G %a' /run/vhostd") == "vhostd kvm 2750\n"
    box.out("cmp /usr/local/share/doc/vhostd/vhostd.toml.example /etc/vhostd/vhostd.toml")

    # systemd-analyze verify on the installed units: not a word.
    verify = box.run("systemd-analyze verify --man=no vhostd.service vhostd@vm1.socket")
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""), verify
    service = unit_settings(box.out(f"cat {UNIT_DIR}/vhostd.service"))
    template = unit_settings(box.out(f"cat {UNIT_DIR}/vhostd@.socket"))
    doc = service["Documentation"].removeprefix("file://")
    assert box.out(f"test -s {doc} && echo yes") == "yes\n", service["Documentation"]

    # ExecStartPre=, as the service: the installed file is fine.
    pre = box.run(shlex.join(["bash", "-c", AS_SERVICE, "svc", *command(service["ExecStartPre"])]))
    assert pre.returncode == 0 and pre.stdout.endswith(": OK\n"), pre

    # ExecStart=, as the service, in a network namespace of its own.
    start = command(service["ExecStart"])
    in_netns = ["unshare", "-n", "bash", "-c", f"ip link set lo up && {AS_SERVICE}", "svc"]
    notify = NotifyReceiver(share / "notify")
    (share / "notify").chmod(0o777)
    try:
        daemon = box.popen([*in_netns, *start], lab_logs / "vhostd.log")
        try:
            ready = notify.wait_for("READY", timeout=60)
            assert ready.fields.get("STATUS") == "serving 2 port(s)", ready
            snap = json.loads(box.out("vhostd status --json"))
            assert snap["pid"] == daemon.pid  # every step exec'd: the PID systemd would watch
            ports = [(p["name"], p["socket"], p["state"]) for p in snap["ports"]]
            assert ports == [
                ("vm1", "/run/vhostd/vm1.sock", "listening"),
                ("vm2", "/run/vhostd/vm2.sock", "dialing"),
            ]
            assert [t["name"] for t in snap["taps"]] == ["vhostd0"]
            assert snap["metrics"] == "http://127.0.0.1:9720" and snap["healthy"]
            assert box.out("stat -c '%U %G %a' /run/vhostd/vm1.sock") == "vhostd kvm 660\n"
            answer = box.out(
                f"/opt/vhostd/bin/python -c {shlex.quote(GET_FEATURES)} /run/vhostd/vm1.sock"
            ).split()
            assert answer[:3] == ["1", "0x5", "8"], answer  # GET_FEATURES, reply, 8 bytes
            assert int(answer[3], 16) & (1 << 32), answer  # VIRTIO_F_VERSION_1
            health = box.out(
                f"nsenter -t {daemon.pid} -n /opt/vhostd/bin/python -c "
                '\'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9720/healthz")'
                ".status)'"
            )
            assert health == "200\n"
            reload = box.run(
                shlex.join(["bash", "-c", AS_SERVICE, "svc", *command(service["ExecReload"])])
            )
            assert reload.returncode == 0, reload
            assert reload.stdout == f"vhostd pid {daemon.pid}: reload applied: nothing changed\n"
            assert len(notify.times("WATCHDOG")) >= 1  # WATCHDOG_USEC honoured
        finally:
            assert stop(daemon) == 0, (lab_logs / "vhostd.log").read_text()
        notify.wait_for("STOPPING", timeout=10)
        assert box.out("ls /run/vhostd") == "control.taps\n"  # the TAP list stays

        # The same ExecStart=, given the socket vhostd@vm3.socket describes (the example
        # configuration has no port vm3): it serves it, and leaves its file.
        listen = template["ListenStream"].replace("%i", "vm3")
        name = template["FileDescriptorName"].replace("%i", "vm3")
        assert (listen, name) == ("/run/vhostd/vm3.sock", "vm3")
        activate = ["systemd-socket-activate", "-l", listen, f"--fdname={name}", "--"]
        daemon = box.popen([*activate, *in_netns, *start], lab_logs / "vhostd-activated.log")
        try:
            mark = notify.mark()
            answer = box.out(
                f"/opt/vhostd/bin/python -c {shlex.quote(GET_FEATURES)} {listen}"
            ).split()  # this connection starts it
            assert answer[:3] == ["1", "0x5", "8"], answer
            notify.wait_for("READY", timeout=60, after=mark)
            snap = json.loads(box.out("vhostd status --json"))
            assert snap["pid"] == daemon.pid
            ports = [(p["name"], p["socket"], p["mode"]) for p in snap["ports"]]
            assert ports == [
                ("vm1", "/run/vhostd/vm1.sock", "switch"),
                ("vm2", "/run/vhostd/vm2.sock", "switch"),
                ("vm3", listen, "switch"),
            ]
        finally:
            assert stop(daemon) == 0, (lab_logs / "vhostd-activated.log").read_text()
        assert box.out("ls /run/vhostd") == "control.taps\nvm3.sock\n"
    finally:
        notify.close()
    log = (lab_logs / "vhostd-activated.log").read_text()
    assert (
        "port vm3: serving the socket the service manager passed (/run/vhostd/vm3.sock) with "
        "the default settings: no [[port]] in /etc/vhostd/vhostd.toml has that name or socket"
    ) in log, log
