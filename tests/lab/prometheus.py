"""The Debian ``prometheus`` server as a test peer: loopback only, storage in a temp dir."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """The Debian ``prometheus`` server on loopback, storage in a temp dir."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: vhostd\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=5) as resp:
            data: bytes = resp.read()
            return data

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/-/ready")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus not ready:\n{self.log()}") from None
                time.sleep(0.1)

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert data["status"] == "success", data
        return [(r["metric"], float(r["value"][1])) for r in data["data"]["result"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def samples(self, selector: str, window: str = "10m") -> list[float]:
        """Every value scraped for the one series ``selector`` names, oldest first."""
        query = urllib.parse.urlencode({"query": f"{selector}[{window}]"})
        data = json.loads(self.get("/api/v1/query?" + query))
        assert data["status"] == "success", data
        result = data["data"]["result"]
        assert len(result) == 1, (selector, result)
        return [float(v) for _, v in result[0]["values"]]
