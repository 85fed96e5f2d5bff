"""Prometheus metrics and /healthz: exposition contents, conventions, and a real Prometheus."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.daemon import REPO, VhostdProcess, port_config, serving
from tests.e2e.vhostd_status import metrics_target
from tests.lab.fixtures import require_binary
from tests.lab.prometheus import Prometheus
from tests.vusim.frontend import Frontend
from vhostd import buildinfo
from vhostd.config import MetricsConfig
from vhostd.control import bind_control
from vhostd.daemon import Daemon
from vhostd.metrics import METRIC_NAMES
from vhostd.runtime import EX_CONFIG, SetupError
from vhostd.session import MISS_OUTSTANDING

LOOPBACK_ANY = MetricsConfig("127.0.0.1:0")


async def http_get(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request to the daemon's metrics listener; (status, body)."""
    assert daemon.metrics_address is not None
    host, port = daemon.metrics_address
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


async def scrape(daemon: Daemon) -> str:
    code, body = await http_get(daemon, "/metrics")
    assert code == 200
    return body.decode()


def test_traffic_moves_counters_and_histogram_is_cumulative(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "vm1.sock"

    async def main() -> None:
        async with serving(
            port_config(sock, "sink", iommu=True, queue_pairs=1),
            metrics=LOOPBACK_ANY,
            control_socket=str(tmp_sock_dir / "c.sock"),
        ) as d:
            before = await scrape(d)
            q = {"port": "vm1", "queue": "0", "direction": "tx"}
            assert value(before, "vhostd_queue_packets_total", **q) == 0
            assert value(before, "vhostd_frontend_connected", port="vm1") == 0
            async with Frontend.connect(str(sock)) as fe:
                await fe.net_setup(queue_pairs=1, iommu=True)
                assert len(await fe.send_frames(1, [b"\x02" * 60] * 40)) == 40
                after = await scrape(d)
                assert value(after, "vhostd_frontend_connected", port="vm1") == 1
                assert value(after, "vhostd_negotiated_features", port="vm1") == fe.features
                assert value(after, "vhostd_iotlb_entries", port="vm1") > 0
                assert value(after, "vhostd_iotlb_enabled", port="vm1") == 1
            assert value(after, "vhostd_queue_packets_total", **q) == 40
            assert value(after, "vhostd_queue_bytes_total", **q) == 40 * 60
            assert value(after, "vhostd_queue_kicks_total", **q) >= 1
            assert value(after, "vhostd_queue_interrupts_total", **q) >= 1
            assert value(after, "vhostd_connections_total", port="vm1") == 1
            misses = value(after, "vhostd_iotlb_miss_requests_total", port="vm1")
            assert misses > 0
            assert value(after, "vhostd_iotlb_updates_total", port="vm1") >= misses
            assert value(after, "vhostd_iotlb_lookups_total", port="vm1") > 0

            # The miss-service histogram: cumulative, +Inf == count, sum > 0.
            (hist,) = [
                f
                for f in text_string_to_metric_families(after)
                if f.name == "vhostd_iotlb_miss_service_seconds"
            ]
            assert hist.type == "histogram"
            buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
            les = [float(s.labels["le"]) for s in buckets]
            counts = [s.value for s in buckets]
            assert les == sorted(les) and les[-1] == float("inf")
            assert counts == sorted(counts)
            count = _one(hist.samples, "_count").value
            assert counts[-1] == count == d.ports["vm1"].stats.iotlb_miss_time.count > 0
            assert 0 < _one(hist.samples, "_sum").value < count * 2.0

    trio.run(main)


def _one(items: list[Sample], suffix: str) -> Sample:
    (s,) = [s for s in items if s.name.endswith(suffix)]
    return s


FAMILY_LABELS = {
    "vhostd_port_info": {"socket", "mode"},
    "vhostd_build_info": {"version", "python", "native"},
    "vhostd_port_warning": {"code"},
}
"""Labels beyond the common ones that a family may carry."""


def test_names_follow_prometheus_conventions(tmp_sock_dir: Path) -> None:
    async def main() -> None:
        async with serving(
            port_config(tmp_sock_dir / "a.sock", queue_pairs=2),
            metrics=LOOPBACK_ANY,
            control_socket=str(tmp_sock_dir / "c.sock"),
        ) as d:
            d.ports["a"].stats.protocol_errors["bad_size"] += 1
            text = await scrape(d)
        families = list(text_string_to_metric_families(text))
        ours = {f.name for f in families if f.name.startswith("vhostd_")}
        # The text parser names a counter family without its _total.
        expected = {n.removesuffix("_total") for n in METRIC_NAMES}
        assert ours == expected
        for f in families:
            assert f.name.startswith(("vhostd_", "process_")), f.name
            assert f.documentation, f.name
            assert f.name == f.name.lower()
            for s in f.samples:
                if f.type == "counter":
                    assert s.name.endswith(("_total", "_created")), s.name
                if "seconds" in s.name or "bytes" in s.name:
                    assert f.type in ("counter", "gauge", "histogram")
                assert set(s.labels) <= {"port", "queue", "direction", "kind", "tap", "le"} | (
                    FAMILY_LABELS.get(f.name, set())
                )
        assert value(text, "vhostd_protocol_errors_total", port="a", kind="bad_size") == 1
        build = {"version": buildinfo.version(), "python": platform.python_version()}
        assert value(text, "vhostd_build_info", native=buildinfo.native(), **build) == 1
        # Every configured queue has series before any traffic (rate() needs a zero).
        pkts = [k for k in samples(text) if k[0] == "vhostd_queue_packets_total"]
        assert len(pkts) == 4

    trio.run(main)


def test_healthz_and_http_edges(tmp_sock_dir: Path) -> None:
    async def main() -> None:
        async with serving(
            port_config(tmp_sock_dir / "a.sock"),
            port_config(tmp_sock_dir / "b.sock"),
            metrics=LOOPBACK_ANY,
            control_socket=str(tmp_sock_dir / "c.sock"),
        ) as d:
            assert d.metrics_address is not None and d.metrics_address[1] != 0
            assert await http_get(d, "/healthz") == (200, b"ok\n")
            assert (await http_get(d, "/metrics?x=1"))[0] == 200
            assert await http_get(d, "/healthz", "HEAD") == (200, b"")
            assert (await http_get(d, "/nope"))[0] == 404
            assert (await http_get(d, "/metrics", "POST"))[0] == 405
            d.ports["b"].close()  # a port that stopped listening: not serving
            code, body = await http_get(d, "/healthz")
            assert (code, body) == (503, b"not serving\n")
            assert value(await scrape(d), "vhostd_up") == 0
            # Garbage and a silent client cost nothing but their connection.
            host, port = d.metrics_address
            async with await trio.open_tcp_stream(host, port) as s:
                await s.send_all(b"\x00\x01 junk\r\n\r\n")
                assert (await s.receive_some(100)).startswith(b"HTTP/1.1 400")
            async with await trio.open_tcp_stream(host, port) as idle:
                assert (await http_get(d, "/healthz"))[0] == 503
                del idle

    trio.run(main)


def test_busy_metrics_port_stops_the_start(tmp_sock_dir: Path) -> None:
    """An explicitly configured listener that cannot be had is a start-up error (one
    line), not a daemon that runs unobservable and calls itself healthy."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        where = f"127.0.0.1:{taken.getsockname()[1]}"

        async def main() -> None:
            with pytest.raises(BaseExceptionGroup) as refused:
                async with serving(
                    port_config(tmp_sock_dir / "a.sock"),
                    metrics=MetricsConfig(where),
                    control_socket=str(tmp_sock_dir / "c.sock"),
                ):
                    pass
            assert refused.group_contains(
                SetupError,
                match=rf"^metrics: cannot listen on {where}: Address already in use \(another "
                r"vhostd or exporter there\?\): free it or fix \[metrics\] listen= "
                r"\(--metrics-listen\)$",
            )
            # Nothing is left behind: no port socket, no control socket, no lock.
            assert list(tmp_sock_dir.iterdir()) == []

        trio.run(main)

        # The command: exit 78 (EX_CONFIG), one line, and no READY=1 for systemd.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(tmp_sock_dir / "notify"))
            notify.setblocking(False)
            env = dict(os.environ, NOTIFY_SOCKET=str(tmp_sock_dir / "notify"))
            sock, ctl = tmp_sock_dir / "b.sock", tmp_sock_dir / "ctl.sock"
            args = ["--socket", str(sock), "--control-socket", str(ctl), "--metrics-listen", where]
            done = subprocess.run(
                [sys.executable, "-m", "vhostd", "run", *args],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
                timeout=60,
                check=False,
            )
            assert done.returncode == EX_CONFIG, done.stderr
            errors = [line for line in done.stderr.splitlines() if line.startswith("vhostd: ")]
            assert errors == [f"vhostd: metrics: cannot listen on {where}: Address already in use"
                              " (another vhostd or exporter there?): free it or fix [metrics] "
                              "listen= (--metrics-listen)"], done.stderr  # fmt: skip
            with pytest.raises(BlockingIOError):
                notify.recv(4096)  # not READY=1, nor anything else
            assert not sock.exists() and not ctl.exists()


def test_control_socket_that_cannot_be_bound_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SetupError) as refused:
        bind_control(str(tmp_path / "file" / "control.sock"))
    (line,) = refused.value.problems
    assert line.startswith(f"control socket {tmp_path}/file/control.sock: cannot listen: ")
    assert line.endswith("fix control_socket= (--control-socket) or the directory's permissions")


def test_promtool_accepts_the_exposition(tmp_sock_dir: Path) -> None:
    require_binary("promtool", "prometheus")
    sock = tmp_sock_dir / "vm1.sock"

    async def main() -> str:
        async with serving(
            port_config(sock, "sink", iommu=True, queue_pairs=2),
            metrics=LOOPBACK_ANY,
            control_socket=str(tmp_sock_dir / "c.sock"),
        ) as d:
            d.ports["vm1"].stats.protocol_errors["bad_size"] += 1
            d.ports["vm1"].stats.queue_faults["head_out_of_range"] += 1
            async with Frontend.connect(str(sock)) as fe:
                await fe.net_setup(queue_pairs=2, iommu=True)
                await fe.send_frames(1, [b"\x02" * 60] * 5)
                return await scrape(d)

    text = trio.run(main)
    assert "vhostd_iotlb_miss_service_seconds_bucket" in text
    out = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout + out.stderr
    )


# -- a real Prometheus scraping a vhostd process ---------------------------------


@pytest.fixture
def vhostd_with_metrics(tmp_sock_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A vhostd process with an IOMMU sink port; yields (metrics host:port, port socket)."""
    sock, ctl = tmp_sock_dir / "vm1.sock", tmp_sock_dir / "control.sock"
    config = tmp_path / "vhostd.toml"
    config.write_text(
        f'control_socket = "{ctl}"\n[metrics]\nlisten = "127.0.0.1:9"\n'
        f'[[port]]\nsocket = "{sock}"\nmode = "sink"\nqueue_pairs = 1\niommu = true\n'
    )
    # --metrics-listen overrides the file; port 0 picks a free one.
    args = ["--config", str(config), "--metrics-listen", "127.0.0.1:0"]
    proc = VhostdProcess(args, tmp_path / "vhostd.log")
    with proc.start(wait_for=[sock, ctl]):
        target = metrics_target(ctl)
        assert target.startswith("127.0.0.1:"), proc.log()
        yield target, sock


@pytest.mark.e2e
def test_real_prometheus_scrapes_increasing_packets(
    vhostd_with_metrics: tuple[str, Path], tmp_path: Path
) -> None:
    require_binary("prometheus", "prometheus")
    target, sock = vhostd_with_metrics
    prom = Prometheus(tmp_path, target)
    try:
        prom.wait_ready()

        async def main() -> None:
            async with Frontend.connect(str(sock)) as fe, trio.open_nursery() as nursery:
                await fe.net_setup(queue_pairs=1, iommu=True)

                async def traffic() -> None:
                    while True:
                        await fe.send_frames(1, [b"\x02" * 60] * 16)
                        await trio.sleep(0.05)

                nursery.start_soon(traffic)
                await trio.to_thread.run_sync(watch, prom)
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        prom.stop()


def watch(prom: Prometheus, timeout: float = 40.0) -> None:
    """Until Prometheus has seen the TX packet counter grow across scrapes."""
    packets = 'vhostd_queue_packets_total{port="vm1",direction="tx",queue="0"}'
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < 3:
        assert time.monotonic() < deadline, f"packets seen {seen}\n{prom.log()}"
        time.sleep(0.5)
        result = prom.query(packets)
        if result and (not seen or result[0][1] != seen[-1]):
            seen.append(result[0][1])
            assert seen == sorted(seen), seen  # a counter never goes back
    ((labels, up),) = prom.query('up{job="vhostd"}')
    assert up == 1, labels
    ((_, rate),) = prom.query(f"rate({packets}[5s])")
    assert rate > 0
    # IOTLB series arrive under their names and move with the simulator's vIOMMU.
    ((_, misses),) = prom.query('vhostd_iotlb_miss_requests_total{port="vm1"}')
    ((_, entries),) = prom.query('vhostd_iotlb_entries{port="vm1"}')
    assert misses > 0 and entries > 0
    # One expression, so both counters come from the same scrape; a scrape may
    # land while the simulator has a few MISSes still to answer.
    ((_, unanswered),) = prom.query(
        'vhostd_iotlb_miss_requests_total{port="vm1"} - vhostd_iotlb_updates_total{port="vm1"}'
    )
    assert unanswered <= 2 * MISS_OUTSTANDING
    buckets = prom.query('vhostd_iotlb_miss_service_seconds_bucket{port="vm1"}')
    assert len(buckets) == 13
    ((_, count),) = prom.query('vhostd_iotlb_miss_service_seconds_count{port="vm1"}')
    assert count > 0


def test_readme_table_lists_every_metric() -> None:
    """Every family in METRIC_NAMES is in README's metrics table (``{a,b}`` expanded)."""
    readme = (REPO / "README.md").read_text()
    listed: set[str] = set()
    for row in re.findall(r"^\| (.+?) \| .+ \|$", readme, re.M):
        for name in re.findall(r"`(vhostd_[^`]+)`", row):
            name = re.sub(r"\{[a-z_,]*=?[^}]*\}$", "", name)  # labels: {port,code}
            brace = re.search(r"\{([a-z_,]+)\}", name)
            parts = brace.group(1).split(",") if brace else [""]
            for part in parts:
                listed.add(name[: brace.start()] + part + name[brace.end() :] if brace else name)
    assert set(METRIC_NAMES) <= listed, set(METRIC_NAMES) - listed
