"""The C core under AddressSanitizer and UndefinedBehaviorSanitizer.

The same sources as ``vhostd._native`` are built with both sanitizers as
``vhostd._native_san`` and loaded instead of it (``VHOSTD_SANITIZE=1``); the
ASan runtime is preloaded into a child Python and every allocation goes
through malloc (``PYTHONMALLOC=malloc``) so ASan sees the bounds of the
buffers Python hands to C. Guest memory itself is mmap'd, which ASan does not
watch: fences of inaccessible pages around every region catch overruns there
(``tests/test_memory.py``). In the child: the fast-path tests, then the fuzz
target for a bounded time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import REPO

FUZZ_SECONDS = float(os.environ.get("VHOSTD_FUZZ_SECONDS", "60"))
FINDINGS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def _runtime() -> str:
    path = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(path).is_file():
        pytest.fail(f"gcc has no ASan runtime ({path}): install libasan (gcc's)")
    return path


@pytest.fixture(scope="module")
def sanitized() -> dict[str, str]:
    """Build the sanitizer variant from the current sources; the environment that loads it."""
    build = subprocess.run(
        [sys.executable, "vhostd/_native_build.py", "--sanitize"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return dict(
        os.environ,
        VHOSTD_SANITIZE="1",
        LD_PRELOAD=_runtime(),
        PYTHONMALLOC="malloc",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
    )


def _run(env: dict[str, str], args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _clean(done: subprocess.CompletedProcess[str]) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    for finding in FINDINGS:
        assert finding not in out, out[-6000:]


_OVERRUN = """
from vhostd import native
from vhostd.native import ffi, lib
assert native._module.__name__ == "vhostd._native_san", native._module.__name__
frames = ffi.new("struct vhostd_frame[]", 2)
short, full = ffi.new("uint8_t[]", 4), ffi.new("uint8_t[]", 12)
frames[0].ptr, frames[0].len = short, 12   # says 12 bytes, has 4
frames[1].ptr, frames[1].len = full, 12
lib.vhostd_mac_run(frames, 0, 2)
print("no finding")
"""


def test_the_sanitizer_build_is_loaded_and_catches_an_overrun(sanitized: dict[str, str]) -> None:
    """Without this the other two could pass against a build that checks nothing."""
    done = _run(sanitized, ["-c", _OVERRUN], timeout=120)
    assert "no finding" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]


def test_fast_path_tests_run_clean_under_the_sanitizers(sanitized: dict[str, str]) -> None:
    tests = [
        "tests/test_fastpath.py",
        "tests/test_fastpath_agree.py",
        "tests/test_memory.py",
        "tests/test_source.py",
        "tests/test_switch_burst.py",
        "tests/test_switch_native.py",
    ]
    _clean(_run(sanitized, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 1200))


def test_fuzz_target_runs_clean_under_the_sanitizers(sanitized: dict[str, str]) -> None:
    done = _run(sanitized, ["-m", "tests.fuzz_native", "--seconds", str(FUZZ_SECONDS)], 600)
    _clean(done)
    assert "no divergence" in done.stdout
