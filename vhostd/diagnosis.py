"""Why a connected guest has no network, told from what the back-end can see.

A front-end whose guest RAM vhostd cannot share looks healthy from outside:
connected, DRIVER_OK, rings started, no errors. Each :class:`Session` runs
:meth:`Diagnosis.watch`, which looks once a second (no work on the data
path) for two symptoms and reports each once per connection, after it lasted
:data:`GRACE_SECONDS`: a WARNING log line and a ``warnings`` entry of the
port in ``vhostd status`` (and ``vhostd_port_warning``).

``no_memory_table``
    The front-end set DRIVER_OK, or its guest kicks a ring, and no memory
    table ever came. QEMU 7.2 with RAM that has no fd (plain ``-m``, or
    ``memory-backend-ram``) sends no SET_MEM_TABLE/ADD_MEM_REG at all: its
    SET_VRING_ADDRs are refused and it carries on.
``rings_not_moving``
    A memory table came and rings started, the guest kicks, but no ring's
    avail index ever moved. QEMU with ``share=off`` (memfd or file) still
    sends the fd of its now *private* mapping: vhostd maps the file and sees
    its zeros, never the guest's writes.

Kicks are counted on the eventfds: every write adds one, a read returns the
sum. vhostd's own writes (to wake a ring's task) are counted in
``Vring.kick_writes``; what the ring tasks (or the check, for a ring that
never started) read goes to ``Vring.kick_reads``. QEMU creates each host
notifier with a count of one, so that a kick from before the back-end took
over is not lost: the first count on every kick fd is QEMU's, not the
guest's, and a guest whose interface is down kicks nothing more.
"""

from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from protocol import DeviceStatus

from .vring import Vring, drain

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
"""How often a connection is looked at until its rings are seen moving."""
GRACE_SECONDS = 3.0
"""How long a symptom must last before it is reported."""
FRONTEND_KICKS = 1
"""Counts the front-end puts on a fresh kick fd (QEMU: 1); not the guest's kicks."""

SHARE_HINT = (
    "guest memory must be shared with vhostd: QEMU -object "
    "memory-backend-memfd,id=mem,size=...,share=on (or memory-backend-file,...,share=on) "
    "used as guest RAM with -machine memory-backend=mem or -numa node,memdev=mem; "
    "libvirt <memoryBacking><access mode='shared'/></memoryBacking>"
)


@dataclass(slots=True, frozen=True)
class Finding:
    """One symptom reported on a connection."""

    code: str
    """``no_memory_table`` or ``rings_not_moving`` (the ``code`` label of the metric)."""
    message: str
    since: float
    """Unix time it was reported."""


def guest_kicks(vring: Vring) -> int:
    """Kicks the guest made on ``vring``'s current kick fd (read so far)."""
    return max(0, vring.kick_reads - vring.kick_writes - FRONTEND_KICKS)


def _collect_unwatched_kicks(vring: Vring) -> None:
    """Read the kick fd of a ring that has no task (it never started): nobody else does.

    When the ring starts later its task works the ring before it waits, so no
    kick is lost by reading it here.
    """
    if vring.kick is None or vring.started:
        return
    poller = select.poll()
    poller.register(vring.kick, select.POLLIN)
    if poller.poll(0):
        vring.kick_reads += drain(vring.kick)


def ring_moved(vring: Vring) -> bool:
    """The driver ever made a chain available on this ring (as vhostd sees its memory).

    Read only through views the ring's task translated and that are still
    current: the check must not count IOTLB lookups or misses of its own.
    """
    q = vring.tx or vring.rx
    if q is None or vring.failed is not None:
        return False
    queue = q.queue
    # A split ring starts at index 0; a packed ring where its base put it.
    start = queue.first_avail if queue.packed else 0
    if queue.last_avail != start:
        return True
    if queue._gen is None or queue._gen != queue.mem.generation:
        return False
    return queue.avail_idx() != start


class Diagnosis:
    """The symptoms seen on one connection, and the task that looks for them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.findings: dict[str, Finding] = {}
        """Symptoms that lasted the grace time and still hold, by code."""
        self.settled = False
        """A ring moved: guest and vhostd share memory; nothing more to look for."""
        self._onset: dict[str, float] = {}
        self._logged: set[str] = set()

    async def watch(self, session: Session) -> None:
        """Check ``session`` every :data:`CHECK_SECONDS` until its rings are seen moving."""
        while not self.settled:
            await trio.sleep(CHECK_SECONDS)
            self.check(session, trio.current_time())

    def check(self, session: Session, now: float) -> None:
        """Look at the session once; ``now`` is on the clock of :data:`GRACE_SECONDS`."""
        for vring in session.vrings:
            _collect_unwatched_kicks(vring)
        if any(ring_moved(v) for v in session.vrings):
            self.settled = True
            for code in self.findings:
                log.info("%s: %s no longer holds: a ring moved", self.name, code)
            self.findings.clear()
            return
        symptoms = self.symptoms(session)
        for code in list(self._onset):
            if code not in symptoms:
                del self._onset[code]
                self.findings.pop(code, None)
        for code, message in symptoms.items():
            onset = self._onset.setdefault(code, now)
            if code not in self.findings and now - onset >= GRACE_SECONDS:
                self.findings[code] = Finding(code, message, time.time())
                if code not in self._logged:  # once per connection, however it flaps
                    self._logged.add(code)
                    log.warning("%s: %s", self.name, message)

    def symptoms(self, session: Session) -> dict[str, str]:
        """What is wrong now, by code (empty when nothing is)."""
        kicked = {v.index: n for v in session.vrings if (n := guest_kicks(v))}
        kicks = ", ".join(f"vring {i}: {n}" for i, n in kicked.items())
        driver_ok = bool(session.status & DeviceStatus.DRIVER_OK)
        if not len(session.table):
            if not (driver_ok or kicked):
                return {}
            what = " and ".join(
                w
                for w in (
                    "the front-end set DRIVER_OK" if driver_ok else "",
                    f"the guest kicks ({kicks})" if kicked else "",
                )
                if w
            )
            return {
                "no_memory_table": f"{what}, but no memory table ever came (SET_MEM_TABLE or "
                "ADD_MEM_REG): guest RAM has no fd to share (plain -m or memory-backend-ram), "
                f"so the rings cannot be reached and the guest has no network; {SHARE_HINT}"
            }
        if kicked and any(v.started for v in session.vrings):
            return {
                "rings_not_moving": f"the guest kicks ({kicks}) but no ring ever moved (every "
                "avail index reads 0): vhostd maps the memory the front-end sent, but the guest "
                "writes to a private copy of it (share=off), so it has no network; "
                f"{SHARE_HINT}"
            }
        return {}
