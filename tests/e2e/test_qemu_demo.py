"""scripts/demo.py, the README's first command, keeps working and stays short."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon import REPO
from tests.lab.assets import GuestImage

pytestmark = pytest.mark.e2e


def test_demo_script(guest_image: GuestImage) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("0% packet loss") == 2, out
    assert "demo: PASS" in out, out
    # One counter row per port, both guests' frames counted in each direction.
    rows = re.findall(r"^\s+(guest\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+0$", out, re.M)
    assert [r[0] for r in rows] == ["guest1", "guest2"], out
    for _, rx_pkts, _, tx_pkts, _ in rows:
        assert int(rx_pkts) >= 5 and int(tx_pkts) >= 5, out
    workdir = re.search(r"--socket (/tmp/vhostd-demo-\S+)/guest1\.sock", out)
    assert workdir and not Path(workdir.group(1)).exists(), "demo left its directory behind"
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"
