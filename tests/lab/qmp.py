"""A minimal QMP client: QEMU's JSON machine protocol on a Unix socket.

QEMU is started with ``-qmp unix:PATH,server=on,wait=off`` (``GuestConfig.qmp``). Each
message is one JSON object on its own line: a greeting, then for every command one
``{"return": ...}`` or ``{"error": ...}``, with asynchronous ``{"event": ...}`` lines in
between, which are kept in ``events`` rather than mistaken for answers.

>>> with Qmp.connect(path) as qmp:
...     qmp.execute("migrate", uri="tcp:127.0.0.1:4444")
...     qmp.execute("query-migrate")["status"]
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class QmpError(RuntimeError):
    """QEMU answered a command with an error (its class and description)."""


class Qmp:
    """One QMP session; ``execute`` is synchronous and bounded by ``timeout``."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, timeout: float = 30.0) -> Self:
        """Connects once QEMU has created the socket (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QMP socket at {path} within {timeout:.0f}s") from None
                time.sleep(0.1)
                continue
            sock.settimeout(timeout)
            return cls(sock, timeout)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the QMP socket")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Runs ``command`` and returns its ``return`` value; QmpError on ``error``."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                err = message["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            elif "return" in message:
                return message["return"]

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
