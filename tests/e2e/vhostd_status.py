"""Helpers for the QEMU interoperability tests: vhostd as a process and its status.

The tests read vhostd only through what a user has: ``vhostd status --json`` on the
control socket. Counters there belong to ports and survive disconnects, but the
negotiated features are reported only while a front-end is connected, so tests read
those as soon as a guest is READY.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.daemon import REPO, VhostdProcess
from vhostd.control import fetch

Status = dict[str, Any]


def status(control: Path, timeout: float = 15.0) -> Status:
    """One JSON snapshot from ``python -m vhostd status --json``."""
    done = subprocess.run(
        [sys.executable, "-m", "vhostd", "status", "--json", "--control-socket", str(control)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert done.returncode == 0, f"vhostd status failed: {done.stderr}"
    result: Status = json.loads(done.stdout)
    return result


def port(snapshot: Status, name: str) -> Status:
    """The port called ``name`` (its socket file's stem)."""
    for p in snapshot["ports"]:
        if p["name"] == name:
            found: Status = p
            return found
    raise KeyError(f"no port {name!r} in {[p['name'] for p in snapshot['ports']]}")


def wait_status(
    control: Path, check: Callable[[Status], bool], what: str, timeout: float = 60.0
) -> Status:
    """Polls the snapshot until ``check`` holds (an event in the daemon, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = status(control)
        if check(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"vhostd never reached: {what}\n{json.dumps(snap, indent=1)}")
        time.sleep(0.2)


def start_vhostd(
    sockets: Sequence[Path],
    control: Path,
    log: Path,
    *extra: str,
    wrapper: Sequence[str] = (),
) -> VhostdProcess:
    """``vhostd run --socket ... --control-socket CONTROL`` started and listening."""
    args = [a for s in sockets for a in ("--socket", str(s))]
    args += ["--control-socket", str(control), *extra]
    return VhostdProcess(args, log, wrapper=wrapper).start(wait_for=[*sockets, control])


def assert_clean(p: Status) -> None:
    """No protocol error, no stopped ring, no unanswered miss on this port."""
    assert p["protocol_errors"] == {}, p["protocol_errors"]
    assert p["queue_faults"] == {}, p["queue_faults"]
    assert p["iotlb"]["miss_timeouts"] == 0, p["iotlb"]
    assert p["iotlb"]["access_failures"] == 0, p["iotlb"]


def metrics_target(control: Path, timeout: float = 15.0) -> str:
    """``host:port`` of the daemon's metrics endpoint, once it is listening.

    The control socket answers as soon as it exists; the metrics listener
    may bind a moment later, and the snapshot says null until then.
    """
    deadline = time.monotonic() + timeout
    while True:
        url = fetch(str(control))["metrics"]
        if url:
            assert url.startswith("http://"), url
            return str(url).removeprefix("http://")
        assert time.monotonic() < deadline, "the metrics endpoint never came up"
        time.sleep(0.05)
