"""Guests behind an intel-iommu vIOMMU through vhostd's device IOTLB, strict and lazy.

One guest flushes strictly (an unmap + invalidate per buffer), its peer lazily (batched
flush-alls, whose range ends exactly at 2**64); both have the vIOMMU, so one run of
ping + 8 MiB TCP each way exercises both modes and every assertion is on a vIOMMU guest.
Under TCG every buffer costs a MISS round trip to QEMU, so the transfer takes ~1-2 min.
A real Prometheus scrapes the daemon all along: the packet and IOTLB series it stored
must rise with the guests' traffic.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.vhostd_status import assert_clean, metrics_target, port, start_vhostd, status
from tests.lab.assets import GuestImage
from tests.lab.fixtures import require_binary
from tests.lab.prometheus import Prometheus
from tests.lab.qemu import Guest, Iommu, tcp_pair

pytestmark = pytest.mark.e2e

SIZE = 8 << 20
TIMEOUT = 400  # guest-side timeout for the whole transfer (TCG + a MISS per buffer)


def test_strict_and_lazy_viommu_guests_ping_and_tcp(
    guest_image: GuestImage, tmp_sock_dir: Path, lab_logs: Path, tmp_path: Path
) -> None:
    require_binary("prometheus", "prometheus")
    socks = {Iommu.STRICT: tmp_sock_dir / "strict.sock", Iommu.LAZY: tmp_sock_dir / "lazy.sock"}
    control = tmp_sock_dir / "control.sock"
    server, client = tcp_pair(
        socks[Iommu.STRICT],
        socks[Iommu.LAZY],
        size=SIZE,
        timeout=TIMEOUT,
        server_iommu=Iommu.STRICT,
        client_iommu=Iommu.LAZY,
    )
    metrics = ("--metrics-listen", "127.0.0.1:0")
    with start_vhostd(list(socks.values()), control, lab_logs / "vhostd.log", *metrics) as vhostd:
        prom = Prometheus(tmp_path, metrics_target(control))
        try:
            prom.wait_ready()
            with (
                Guest(guest_image, server, lab_logs, "strict") as strict,
                Guest(guest_image, client, lab_logs, "lazy") as lazy,
            ):
                for g in (strict, lazy):
                    g.wait_for(r"DMAR: IOMMU enabled", timeout=90)
                    g.wait_for(r"VHOSTD-READY", timeout=90)
                negotiated = status(control)  # features are only reported while connected
                r_lazy = lazy.result(timeout=TIMEOUT + 60)
                r_strict = strict.result(timeout=60)
                final = status(control)
            time.sleep(2)  # one more scrape after the last packet
            scraped = {
                (name, series): prom.samples(f'{series}{{port="{name}"{labels}}}')
                for name in ("strict", "lazy")
                for series, labels in (
                    ("vhostd_queue_packets_total", ',direction="tx",queue="0"'),
                    ("vhostd_queue_packets_total", ',direction="rx",queue="0"'),
                    ("vhostd_iotlb_miss_requests_total", ""),
                    ("vhostd_iotlb_updates_total", ""),
                )
            }
            up = prom.query('up{job="vhostd"}')
        finally:
            prom.stop()
    log = vhostd.log()

    for g, r in ((strict, r_strict), (lazy, r_lazy)):
        assert r.passed, (r, g.serial())
        assert r.tcp_md5_ok and r.tcp_sent == r.tcp_recv == SIZE, r
        # The guest kernel logs a DMAR fault for any access outside its mappings.
        assert r.dmar_faults == 0, g.serial()
    assert r_lazy.ping_loss == 0.0

    counts = {}
    for mode in (Iommu.STRICT, Iommu.LAZY):
        p = port(negotiated, mode.value)
        assert p["connected"], p
        assert "ACCESS_PLATFORM" in p["feature_names"], p["feature_names"]
        assert p["iotlb"]["enabled"], p["iotlb"]
        f = port(final, mode.value)
        assert_clean(f)
        io = counts[mode] = f["iotlb"]
        # Every buffer is a fresh IOVA: thousands of misses, each answered by an UPDATE.
        assert io["misses"] > 1000 and io["miss_sent"] > 1000, io
        assert io["updates"] >= io["miss_sent"], io
        assert io["miss_service_count"] == io["miss_sent"], io
        assert io["invalidations"] > 0, io
        assert io["denied"] == io["blocked_accesses"] == 0, io
        assert f["totals"]["tx"]["bytes"] > SIZE and f["totals"]["rx"]["bytes"] > SIZE, f
    # What Prometheus stored: each series rose with the traffic, never went back, and
    # its last value is what the daemon reported at the end.
    assert [value for _, value in up] == [1.0], up
    for (name, series), values in scraped.items():
        rising = sorted(set(values))
        assert values == sorted(values) and len(rising) >= 3, (name, series, values)
    for name, key in (("strict", "miss_sent"), ("lazy", "miss_sent")):
        assert (
            scraped[name, "vhostd_iotlb_miss_requests_total"][-1] == port(final, name)["iotlb"][key]
        )
    # Strict invalidates every unmapped buffer; lazy batches them into far fewer flushes.
    assert counts[Iommu.STRICT]["invalidations"] > counts[Iommu.LAZY]["invalidations"], counts
    assert "Traceback" not in log, log
    print({m.value: c for m, c in counts.items()})
