"""Live migration on one host: a guest moves from port A to port B of one vhostd.

Guest M boots on port A and pings guest P (port "peer", same switch) every 0.1 s. A
destination QEMU with the same command line plus ``-incoming`` waits on port B, as a
second host's QEMU would wait on that host's vhostd. The source's QMP migrates M with
its bandwidth capped, so RAM is copied for several seconds, over several dirty-sync
rounds, while the pings go on and vhostd logs the guest pages it writes (SET_LOG_BASE,
LOG_ALL, SET_VRING_ADDR with the log flag). At the switch-over the source stops the
device (GET_VRING_BASE) and sends the ring positions along with the device state; the
destination checks them against the rings in the guest's memory before it resumes.

After ``completed`` the destination must run, the source is quit and M, now on port B,
finishes its pings; its console continues in the destination's serial file. At least
95% of them must have been answered (the switch-over itself may cost a few), none twice,
nothing in the guest or in vhostd may complain, and vhostd's status must show that port
A was logging (LOG_ALL negotiated, pages logged) during the migration, that the switch
moved M's MAC to port B and that M's traffic then crossed port B. Once without and once
with a strict vIOMMU (every buffer a fresh IOVA: port B starts with an empty IOTLB).

What this cannot prove is that the log is complete: QEMU marks the used rings dirty
itself when it stops the device, and the guest consumes received frames before the
last copy round, so only frames in flight at the switch-over would arrive stale. That
every page vhostd writes is logged is tests/test_dirty_log.py's job.

``VHOSTD_LAB_TRACE=1`` runs vhostd at debug level and has both QEMUs trace their
vhost-user messages into m-source.trace.log / m-destination.trace.log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.vhostd_status import Status, assert_clean, port, start_vhostd, status, wait_status
from tests.lab.assets import GuestImage
from tests.lab.process import log_tail
from tests.lab.qemu import Guest, GuestConfig, Iommu
from tests.lab.qmp import Qmp
from vhostd.control import fetch

pytestmark = pytest.mark.e2e

MEMORY_MB = 512
# Zero pages cost next to nothing, so a busybox guest sends only ~70 MiB: at 8 MiB/s
# that is ~9 s of copying and 4 dirty syncs under TCG.
BANDWIDTH = 8 << 20
PING_INTERVAL = "0.1"
PING_COUNT = 300  # 30 s of pings: a few before, the migration, a good stretch after
MIN_ANSWERED = 0.95
M_MAC = "52:54:00:00:00:02"
TRACE = os.environ.get("VHOSTD_LAB_TRACE") == "1"


def trace_args(logs: Path, name: str) -> tuple[str, ...]:
    if not TRACE:
        return ()
    events = ("vhost_user_*", "vhost_dev_st*")
    return (*(a for e in events for a in ("-trace", e)), "-D", str(logs / f"{name}.trace.log"))


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def packets(snapshot: Status, name: str, direction: str) -> int:
    count: int = port(snapshot, name)["totals"][direction]["packets"]
    return count


@dataclasses.dataclass
class Migration:
    """What QMP and vhostd's status said while the migration ran."""

    info: dict[str, Any]  # the last query-migrate
    states: list[str]  # every status query-migrate went through
    polls: int = 0  # vhostd status snapshots taken meanwhile
    logging_polls: int = 0  # ... in which port A was logging (LOG_ALL with a dirty log)
    max_log_pages: int = 0  # the most dirty-log bits port A had set in any of them


def migrate(src: Qmp, uri: str, control: Path, timeout: float = 90.0) -> Migration:
    """Migrates with the bandwidth capped, polling QMP and vhostd until it is over."""
    src.execute("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH})
    src.execute("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    run = Migration(info={}, states=[])
    while True:
        run.info = src.execute("query-migrate")
        state = run.info.get("status", "?")
        if not run.states or run.states[-1] != state:
            run.states.append(state)
        if state in ("completed", "failed", "cancelled"):
            return run
        snap = fetch(str(control))  # what `vhostd status --json` prints
        a = port(snap, "a")
        run.polls += 1
        run.logging_polls += a["logging"] and "LOG_ALL" in a["feature_names"]
        run.max_log_pages = max(run.max_log_pages, a["log_pages"])
        if time.monotonic() > deadline:
            raise AssertionError(f"migration not over within {timeout:.0f}s: {run.info}")
        time.sleep(0.2)


def wait_running(qmp: Qmp, guest: Guest, timeout: float = 30.0) -> None:
    """The destination resumed the guest (it loads the device state after `completed`)."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        try:
            state = qmp.execute("query-status")["status"]
        except OSError:
            state = "QEMU gone"
            break
        if state == "running":
            return
        time.sleep(0.1)
    raise AssertionError(
        f"destination not running ({state}): it refused the migration stream?\n"
        f"--- {guest.name} qemu log ---\n{log_tail(guest.qemu_log, 20)}"
    )


@pytest.mark.parametrize(
    ("iommu", "packed"),
    [(None, False), (Iommu.STRICT, False), (None, True)],
    ids=["plain", "viommu-strict", "packed"],
)
def test_guest_migrates_between_ports_while_pinging(
    iommu: Iommu | None, packed: bool, guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    """``packed``: M's NIC has packed rings (``packed=on``); the destination resumes
    them at the positions and wrap counters GET_VRING_BASE gave the source."""
    socks = {name: tmp_sock_dir / f"{name}.sock" for name in ("peer", "a", "b")}
    control = tmp_sock_dir / "control.sock"
    peer = GuestConfig(
        socket=socks["peer"],
        mac="52:54:00:00:00:01",
        role="serve",
        ip="10.0.0.1/24",
        peer="10.0.0.2",
        params={"timeout": 100},
        memory_mb=256,
    )
    source = GuestConfig(
        socket=socks["a"],
        mac=M_MAC,
        role="ping-tally",
        ip="10.0.0.2/24",
        peer="10.0.0.1",
        iommu=iommu,
        params={"timeout": 60, "count": PING_COUNT, "interval": PING_INTERVAL},
        memory_mb=MEMORY_MB,
        qmp=tmp_sock_dir / "a.qmp",
        extra_args=trace_args(lab_logs, "m-source"),
        device_args=",packed=on" if packed else "",
    )
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    # The same machine on port B, with its own QMP socket, waiting for the stream.
    destination = dataclasses.replace(
        source,
        socket=socks["b"],
        qmp=tmp_sock_dir / "b.qmp",
        incoming=uri,
        extra_args=trace_args(lab_logs, "m-destination"),
    )
    debug = ("--log-level", "debug") if TRACE else ()

    with (
        start_vhostd(list(socks.values()), control, lab_logs / "vhostd.log", *debug) as vhostd,
        Guest(guest_image, peer, lab_logs, "peer") as g_peer,
        Guest(guest_image, source, lab_logs, "m-source") as m_src,
        Guest(guest_image, destination, lab_logs, "m-destination") as m_dst,
        Qmp.connect(tmp_sock_dir / "b.qmp") as dst_qmp,
        Qmp.connect(tmp_sock_dir / "a.qmp") as src_qmp,
    ):
        assert dst_qmp.execute("query-status")["status"] == "inmigrate"
        m_src.wait_for(r"VHOSTD-PING start", timeout=120)
        time.sleep(2)  # some pings through port A first
        before = status(control)
        run = migrate(src_qmp, uri, control)
        assert run.info["status"] == "completed", run.info
        wait_running(dst_qmp, m_dst)
        switched = status(control)
        after = wait_status(
            control,
            lambda s: (
                packets(s, "b", "tx") >= packets(switched, "b", "tx") + 20
                and packets(s, "b", "rx") >= packets(switched, "b", "rx") + 20
            ),
            "M's pings and P's replies crossing port B",
            timeout=60,
        )
        # Only now is the paused source shut down, as a source host would after the
        # destination took over: till then port A still held M's MAC, so the switch
        # saw it move to port B.
        with contextlib.suppress(OSError):
            src_qmp.execute("quit")
        assert m_src.proc is not None
        m_src.proc.wait(15)
        r_dst = m_dst.result(timeout=90)
        final = status(control)
    log = vhostd.log()

    ram = run.info["ram"]
    answered = (r_dst.ping_received or 0) / max(1, r_dst.ping_sent or 0)
    print(
        f"\nmigration ({iommu or 'no'} vIOMMU): {run.info['total-time']} ms, "
        f"downtime {run.info.get('downtime')} ms, {ram['dirty-sync-count']} dirty syncs, "
        f"{ram['transferred'] >> 20} MiB sent ({ram['normal']} pages, {ram['duplicate']} zero); "
        f"port A logging in {run.logging_polls} of {run.polls} status polls "
        f"({port(final, 'a')['log_pages']} pages logged); "
        f"pings answered {r_dst.ping_received}/{r_dst.ping_sent} ({answered:.1%})"
    )

    # QMP: a real, bandwidth-limited migration over several dirty-sync rounds.
    assert run.states[-1] == "completed", run.states
    assert ram["dirty-sync-count"] >= 2, ram
    assert run.info["total-time"] >= 2000, run.info
    # The guest: its console went on at the destination; pings answered; nothing wrong.
    assert "VHOSTD-ERROR" not in m_src.serial(), m_src.serial()
    if iommu is not None:
        assert "DMAR: IOMMU enabled" in m_src.serial(), m_src.serial()
    assert r_dst.passed, (r_dst, m_dst.serial())
    assert r_dst.errors == [], r_dst.errors
    assert r_dst.ping_sent == PING_COUNT, r_dst
    assert answered >= MIN_ANSWERED, (r_dst, m_dst.serial())
    assert r_dst.ping_duplicates == 0, r_dst  # a stale frame replayed would come twice
    assert r_dst.dmar_faults == 0 and r_dst.kernel_warnings == 0, m_dst.serial()
    assert "VHOSTD-ERROR" not in g_peer.serial(), g_peer.serial()
    # vhostd, port A: logging while RAM was copied, not before; gone with the source.
    assert run.logging_polls >= 1 and run.max_log_pages > 0, run
    a_before, a_final = port(before, "a"), port(final, "a")
    assert "LOG_ALL" in a_before["offered_feature_names"], a_before
    assert "LOG_ALL" not in a_before["feature_names"] and not a_before["logging"], a_before
    assert a_final["log_pages"] >= run.max_log_pages, a_final
    assert packets(before, "a", "tx") > 0 and packets(before, "a", "rx") > 0, a_before
    assert re.search(r"INFO vhostd\.session: a: dirty log of \d+ KiB", log), log
    assert not a_final["connected"] and a_final["disconnects"] == 1, a_final
    # Port B: the destination's device, resumed where the source stopped.
    b_after, b_final = port(after, "b"), port(final, "b")
    assert b_after["connected"] and "LOG_ALL" not in b_after["feature_names"], b_after
    assert ("RING_PACKED" in b_after["feature_names"]) == packed, b_after["feature_names"]
    if packed:
        # The bases QEMU migrated were exact: nothing to correct from the ring.
        assert "already passed" not in log, log
    if iommu is None:
        assert "ACCESS_PLATFORM" not in b_after["feature_names"], b_after
    else:
        assert "ACCESS_PLATFORM" in b_after["feature_names"], b_after
        assert b_final["iotlb"]["misses"] > 0, b_final["iotlb"]
    # The switch now sends M's frames to port B (learnt from its announce or pings).
    m_entry = next(e for e in after["fdb"] if e["mac"] == M_MAC)
    assert m_entry["port"] == "b", after["fdb"]
    assert after["switch"]["mac_moves"] >= 1, after["switch"]
    assert not port(final, "b")["logging"] and port(final, "b")["log_pages"] == 0
    for name in ("peer", "a", "b"):
        assert_clean(port(final, name))
    assert "Traceback" not in log and " ERROR " not in log, log
