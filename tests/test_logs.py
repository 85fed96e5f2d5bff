"""Log lines: ``<N>`` syslog priorities when stderr is the journal, time and level elsewhere."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon import REPO
from tests.lab.process import stop_process
from vhostd.logs import JournalFormatter, stderr_is_journal, syslog_priority


def test_priorities_follow_sd_daemon() -> None:
    levels = [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
    assert [syslog_priority(level) for level in levels] == [2, 3, 4, 6, 7]
    record = logging.LogRecord("vhostd.session", logging.WARNING, "", 0, "vm: a\nb", None, None)
    assert JournalFormatter().format(record) == "<4>vhostd.session: vm: a\n<4>b"


def test_journal_stream_must_name_stderr_itself(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        ours = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": ours}, stream)
        # Inherited by a child whose stderr goes elsewhere: not the journal.
        assert not stderr_is_journal({"JOURNAL_STREAM": ours}, other)
        assert not stderr_is_journal({}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream)


def _daemon_log(tmp_sock_dir: Path, log: Path, journal: bool) -> str:
    """Start ``vhostd run`` with stderr into ``log``, wait until ready, stop it."""
    sock, ctl = tmp_sock_dir / "vm.sock", tmp_sock_dir / "ctl.sock"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("JOURNAL_STREAM", None)
    with open(log, "wb") as err:
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        argv = ["--socket", str(sock), "--control-socket", str(ctl)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostd", "run", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
            env=env,
        )
    try:
        deadline = time.monotonic() + 15
        while "vhostd ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        assert stop_process(proc) == 0
    return log.read_text()


def test_daemon_writes_priorities_to_the_journal_only(tmp_sock_dir: Path, tmp_path: Path) -> None:
    journal = _daemon_log(tmp_sock_dir, tmp_path / "journal.log", journal=True)
    lines = journal.splitlines()
    assert lines and all(re.match(r"<[0-7]>vhostd[.\w]*: ", line) for line in lines), journal
    assert "<6>vhostd.daemon: vhostd ready: 1 port(s), 0 tap(s)" in lines

    terminal = _daemon_log(tmp_sock_dir, tmp_path / "terminal.log", journal=False)
    ready = [line for line in terminal.splitlines() if "vhostd ready" in line]
    assert ready and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO vhostd.daemon: ", ready[0])
