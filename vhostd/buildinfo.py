"""What this vhostd is: its version, its Python and which data path it runs.

``vhostd --version`` prints it and ``vhostd_build_info`` exports it, so a
report from an operator (or a scrape) says which build it came from.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGE = "vhostd"


def version() -> str:
    """The installed package's version (``unknown`` when run from a bare source tree)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def python_version() -> str:
    return platform.python_version()


def native() -> str:
    """``c`` when sessions use the compiled burst loop, ``python`` for the reference.

    :data:`vhostd.fastpath.ENABLED` once the daemon loaded it; before that the
    environment switch it is read from, so ``vhostd --version`` needs no C core.
    """
    fastpath = sys.modules.get("vhostd.fastpath")
    if fastpath is not None:
        return "c" if fastpath.ENABLED else "python"
    return "python" if os.environ.get("VHOSTD_FASTPATH", "1") == "0" else "c"


def describe() -> str:
    """One line: ``vhostd 0.1.0 (Python 3.11.2, data path c)``."""
    return f"{PACKAGE} {version()} (Python {python_version()}, data path {native()})"
