"""pytest fixtures for end-to-end tests (registered in tests/conftest.py).

Missing peers (QEMU, testpmd, busybox) skip a test on a developer machine, but under
CI (CI=true) they fail it: a CI image that silently skips every e2e test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.assets import BUSYBOX_CANDIDATES, GuestImage
from tests.lab.assets import guest_image as build_guest_image
from tests.lab.dpdk import TESTPMD_BINARY
from tests.lab.netns import Netns
from tests.lab.qemu import QEMU_BINARY


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(what: str, present: bool, hint: str) -> None:
    """Skips (developer machine) or fails (CI) when a peer is missing."""
    if present:
        return
    message = f"{what} missing: {hint}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def require_binary(binary: str, package: str) -> None:
    require(binary, shutil.which(binary) is not None, f"apt-get install {package}")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel + initramfs, fetched/built once (cached across runs)."""
    require_binary(QEMU_BINARY, "qemu-system-x86")
    require(
        "busybox",
        any(Path(p).exists() for p in BUSYBOX_CANDIDATES),
        "apt-get install busybox-static",
    )
    require_binary("apt-get", "apt")
    return build_guest_image()


@pytest.fixture
def testpmd_binary() -> str:
    """Path of dpdk-testpmd (skip or fail as above when absent)."""
    require_binary(TESTPMD_BINARY, "dpdk-dev")
    return shutil.which(TESTPMD_BINARY) or TESTPMD_BINARY


@pytest.fixture
def tmp_sock_dir() -> Iterator[Path]:
    """A short /tmp/vhd-XXXX directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vhd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lab_logs(tmp_path: Path) -> Path:
    """Where guests and testpmd write their logs (pytest keeps the last runs' tmp_path)."""
    return tmp_path


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace, deleted (with everything started inside) afterwards."""
    require_binary("ip", "iproute2")
    require("root (for ip netns)", os.geteuid() == 0, "run as root")
    with Netns() as ns:
        yield ns
