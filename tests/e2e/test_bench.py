"""bench/run.py --quick on its smallest case: both back-ends run and the table prints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.daemon import REPO

pytestmark = pytest.mark.e2e


def test_bench_quick_smoke(testpmd_binary: str) -> None:
    """One round of txonly into vhostd's sink and into net_vhost: both rates are real."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--case",
            "txonly 64B -> sink",
            "--no-idle",
            "--no-iotlb",
            "--no-tcp",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    row = re.search(
        r"^txonly 64B -> sink\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out.stdout, re.M
    )
    assert row, out.stdout
    vhostd_mpps, dpdk_mpps, ratio, cpu = map(float, row.groups())
    assert vhostd_mpps > 0.01 and dpdk_mpps > 0.01, out.stdout
    assert ratio == pytest.approx(vhostd_mpps / dpdk_mpps, rel=0.05)
    assert cpu > 0  # the back-end did burn CPU for the packets it took


def test_bench_tcp_smoke(testpmd_binary: str) -> None:
    """One TCP case through a real guest and a TAP: the row prints with real numbers."""
    case = "guest->TAP vhostd offloads on"
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--case", case,
         "--tcp-size", "4", "--no-idle", "--no-iotlb", "--no-log"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    row = re.search(rf"^{re.escape(case)}\s+([\d.]+)\s+(\d+)\s+(\d+)", out.stdout, re.M)
    assert row, out.stdout
    mbit, tx, rx = float(row[1]), int(row[2]), int(row[3])
    assert mbit > 1 and tx > 1514 and rx > 1514, out.stdout  # super-frames to the kernel


def test_bench_switch_times_the_control_plane_under_load(testpmd_binary: str) -> None:
    """The switch case: each round's ring counters, then status, /metrics and a new
    front-end's answer times taken while both switch ports were saturated."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--case",
            "switch 64B port <-> port",
            "--no-idle",
            "--no-iotlb",
            "--no-log",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for port in ("a", "b"):
        rates = re.search(
            rf"^    {port}: [\d.]+k TX kicks/s, .* TX bursts/s of ([\d.]+) frames", out.stdout, re.M
        )
        assert rates and float(rates.group(1)) > 0, out.stdout
    line = re.search(
        r"^switch 64B port <-> port: vhostd status ([\d./]+), /metrics ([\d./]+), "
        r"new front-end GET_FEATURES ([\d./]+)$",
        out.stdout,
        re.M,
    )
    assert line, out.stdout  # no "unanswered" either: every question got its answer
    for spread in line.groups():
        median, p99, worst = map(float, spread.split("/"))
        assert 0 < median <= p99 <= worst < 5000
