"""Log lines for a terminal or for the journal.

On a terminal (or a file) every line carries its time and level. When
systemd connects stderr to the journal it says so in ``JOURNAL_STREAM``
(``DEVICE:INODE`` of that stream); the journal stamps each line itself, so
lines then start with the ``<N>`` syslog priority prefix of sd-daemon(3)
(``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug) and no
timestamp: ``journalctl -p warning -u vhostd`` then shows just the warnings.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"
HANDLER_NAME = "vhostd-stderr"

_PRIORITIES = (
    (logging.CRITICAL, 2),  # LOG_CRIT
    (logging.ERROR, 3),  # LOG_ERR
    (logging.WARNING, 4),  # LOG_WARNING
    (logging.INFO, 6),  # LOG_INFO
)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (LOG_DEBUG below INFO)."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal stream ``JOURNAL_STREAM`` names.

    The variable is inherited by children whose stderr may go elsewhere, so the
    device and inode must match the stream's, as sd_journal_stream_fd(3) says.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record (a traceback's lines too)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup_logging(
    level: str, env: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> None:
    """Send the daemon's log to stderr, formatted for the journal or for a terminal."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(env, stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)  # set up twice in one process: the last setup wins
    root.addHandler(handler)
    root.setLevel(level.upper())
