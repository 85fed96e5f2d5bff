"""Stopping the processes the lab started, by their PID and nothing else.

Other engineers' daemons, QEMUs and testpmds run on the same machine: never match by
name, never signal a whole process group we did not create.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a log file for failure messages ('' if it does not exist yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
