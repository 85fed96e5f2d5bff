"""The compiled C core (``vhostd/csrc``): its ``ffi`` and ``lib``.

``VHOSTD_SANITIZE=1`` loads the ASan/UBSan build of the same sources
(``python vhostd/_native_build.py --sanitize``) instead: the sanitizer tests
run the fast-path tests and the fuzz target on it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

_module = importlib.import_module(
    "vhostd._native_san" if os.environ.get("VHOSTD_SANITIZE") == "1" else "vhostd._native"
)
ffi: Any = _module.ffi
lib: Any = _module.lib
