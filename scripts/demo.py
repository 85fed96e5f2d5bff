#!/usr/bin/env python3
"""vhostd's main job in under a minute: two QEMU guests ping each other through it.

Run from the repository after ``scripts/install`` (as root on a fresh Debian machine):

    .venv/bin/python scripts/demo.py

It fetches the lab's guest kernel and builds its busybox initramfs once (cached in
.cache/lab), starts ``vhostd run`` with two ports on its default L2 switch, boots two
tiny guests (one per port) that ping each other, then prints the guests' ping output
and vhostd's per-port packet counters. Exits 0 when both guests saw 0% loss; every
process it started is stopped and its temporary directory removed either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

# vhostd and the lab live in the repo; prefer its venv, where vhostd is installed.
if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
sys.path.insert(0, str(REPO))

from tests.daemon import VhostdProcess  # noqa: E402
from tests.lab.assets import guest_image  # noqa: E402
from tests.lab.qemu import QEMU_BINARY, Guest, GuestConfig, GuestResult  # noqa: E402

APT_PACKAGES = ("qemu-system-x86", "busybox-static", "xz-utils", "zstd")
GUESTS = (  # (port/socket name, MAC, address, peer)
    ("guest1", "52:54:00:00:00:01", "10.0.0.1/24", "10.0.0.2"),
    ("guest2", "52:54:00:00:00:02", "10.0.0.2/24", "10.0.0.1"),
)


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def ensure_peers() -> None:
    """QEMU and busybox from Debian when missing (needs root); the lab does the rest."""
    if shutil.which(QEMU_BINARY) and shutil.which("busybox"):
        return
    if os.geteuid() != 0:
        sys.exit("demo: QEMU/busybox missing: run scripts/install as root first")
    say(f"installing {' '.join(APT_PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], check=True, env=env)


def status(control: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "vhostd", "status", "--json", "--control-socket", str(control)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    snapshot: dict[str, Any] = json.loads(out)
    return snapshot


def ping_lines(serial: str) -> list[str]:
    """The guest's ping summary as busybox printed it on the serial console."""
    keep = ("PING ", "packets transmitted", "round-trip")
    return [line.strip() for line in serial.splitlines() if any(k in line for k in keep)]


def main() -> int:
    started = time.monotonic()
    ensure_peers()
    say("preparing the guest kernel and initramfs (cached after the first run)")
    image = guest_image()
    work = Path(tempfile.mkdtemp(prefix="vhostd-demo-", dir="/tmp"))
    try:
        sockets = [work / f"{name}.sock" for name, *_ in GUESTS]
        control = work / "control.sock"
        args = [a for s in sockets for a in ("--socket", str(s))]
        args += ["--control-socket", str(control)]
        say(f"starting: vhostd run {' '.join(args)}")
        with VhostdProcess(args, work / "vhostd.log").start(wait_for=[*sockets, control]):
            configs = [
                GuestConfig(
                    socket=sock,
                    mac=mac,
                    role="ping",
                    ip=ip,
                    peer=peer,
                    params={"count": 5, "timeout": 90},
                )
                for sock, (_, mac, ip, peer) in zip(sockets, GUESTS, strict=True)
            ]
            say("booting two guests (QEMU, about 10 s under TCG) that ping each other")
            results: list[tuple[str, GuestResult, str]] = []
            with (
                Guest(image, configs[0], work, GUESTS[0][0]) as g1,
                Guest(image, configs[1], work, GUESTS[1][0]) as g2,
            ):
                for name, guest in ((GUESTS[0][0], g1), (GUESTS[1][0], g2)):
                    results.append((name, guest.result(timeout=150), guest.serial()))
            snapshot = status(control)
        print()
        for name, _, serial in results:
            address = next(ip for n, _, ip, _ in GUESTS if n == name)
            print(f"--- {name} ({address}) ping:")
            for line in ping_lines(serial):
                print(f"    {line}")
        print("\n--- vhostd per-port counters (directions as the guest sees them):")
        print(
            f"    {'PORT':8} {'RX PKTS':>8} {'RX BYTES':>9} {'TX PKTS':>8} {'TX BYTES':>9} ERRORS"
        )
        for port in snapshot["ports"]:
            rx, tx = port["totals"]["rx"], port["totals"]["tx"]
            errors = sum(port["protocol_errors"].values()) + sum(port["queue_faults"].values())
            print(
                f"    {port['name']:8} {rx['packets']:>8} {rx['bytes']:>9} "
                f"{tx['packets']:>8} {tx['bytes']:>9} {errors}"
            )
        ok = all(r.passed and r.ping_loss == 0.0 for _, r, _ in results)
        print()
        if ok:
            say(f"PASS: both guests pinged each other through vhostd with 0% loss "
                f"({time.monotonic() - started:.0f}s)")  # fmt: skip
            return 0
        for name, result, serial in results:
            if not result.passed:
                say(f"{name} failed: {result.reason}\n{serial[-3000:]}")
        log = (work / "vhostd.log").read_text(errors="replace")
        say("FAIL; vhostd's log ends:\n" + "\n".join(log.splitlines()[-30:]))
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
