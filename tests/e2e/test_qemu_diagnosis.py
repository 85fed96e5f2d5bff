"""A real QEMU guest whose memory is not shared (share=off) is named in the log and status.

What QEMU 7.2 does then: it still sends ADD_MEM_REG with the memfd, but maps it
privately, so vhostd sees the file's zeros: the rings never move while the guest
kicks (its RX fill at ifup). Before this warning, status said connected, DRIVER_OK,
no errors, healthy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.vhostd_status import port, start_vhostd, status, wait_status
from tests.lab.assets import GuestImage
from tests.lab.qemu import Guest, GuestConfig

pytestmark = pytest.mark.e2e


def test_guest_without_shared_memory_is_warned_about(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path
) -> None:
    sock, control = tmp_sock_dir / "vm.sock", tmp_sock_dir / "control.sock"
    guest = GuestConfig(socket=sock, role="idle", params={"timeout": 120}, shared_memory=False)
    with (
        start_vhostd([sock], control, lab_logs / "vhostd.log") as vhostd,
        Guest(guest_image, guest, lab_logs) as g,
    ):
        assert "share=off" in " ".join(g.command())
        g.wait_for(r"VHOSTD-READY", timeout=90)  # eth0 is up: RX buffers posted, kicked
        snap = wait_status(
            control,
            lambda s: any(w["code"] == "rings_not_moving" for w in port(s, "vm")["warnings"]),
            "a rings_not_moving warning",
            timeout=30,
        )
        p = port(snap, "vm")
        assert p["connected"] and "DRIVER_OK" in p["device_status_names"], p
        assert snap["healthy"] and p["protocol_errors"] == {} and p["queue_faults"] == {}
        (warning,) = p["warnings"]
        assert "share=on" in warning["message"], warning
        assert all(v["last_avail"] in (0, None) for v in p["vrings"]), p["vrings"]
        again = status(control)  # a later look: the same single warning
        assert [w["code"] for w in port(again, "vm")["warnings"]] == ["rings_not_moving"]
    log = vhostd.log()
    lines = [line for line in log.splitlines() if "no ring ever moved" in line]
    assert len(lines) == 1, log
    assert " WARNING vhostd.diagnosis: vm: the guest kicks (vring 0: " in lines[0], lines
    assert "Traceback" not in log, log
