"""Host-side counterpart of the guest's tcp-server / tcp-client roles (stdlib only).

Run as a script inside a network namespace (`python3 tcp_peer.py ...`), it speaks the
guest's framing: SIZE random bytes, then their md5 as 32 hex digits and a newline.
Upload (guest client -> server) uses PORT, download (server -> guest client) PORT+1,
both at once. It prints one JSON line: {"sent", "recv", "md5_ok", "elapsed"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time

TRAILER = 33


def make_payload(size: int) -> bytes:
    data = os.urandom(size)
    return data + hashlib.md5(data).hexdigest().encode() + b"\n"


def check_payload(stream: bytes) -> tuple[int, bool]:
    """(payload bytes received, whether the md5 trailer matches)."""
    if len(stream) < TRAILER:
        return len(stream), False
    body, trailer = stream[:-TRAILER], stream[-TRAILER:]
    return len(body), hashlib.md5(body).hexdigest().encode() + b"\n" == trailer


def _send(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # wait for the peer to finish and close
            pass


def _recv(sock: socket.socket, out: list[bytes]) -> None:
    with sock:
        while chunk := sock.recv(1 << 20):
            out.append(chunk)


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run(
    mode: str, host: str, port: int, size: int, timeout: float, flow: str = "both"
) -> dict[str, object]:
    """``flow`` recv / send: only the upload (PORT) / download (PORT+1) stream."""
    deadline = time.monotonic() + timeout
    payload = make_payload(size)
    received: list[bytes] = []
    if flow != "both":
        return _one_way(mode, host, port if flow == "recv" else port + 1, flow, payload, deadline)
    if mode == "server":
        listeners = []
        for p in (port, port + 1):
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, p))
            ls.listen(1)
            ls.settimeout(timeout)
            listeners.append(ls)
        print(json.dumps({"listening": port}), flush=True)
        up, _ = listeners[0].accept()
        down, _ = listeners[1].accept()
        for ls in listeners:
            ls.close()
        receiver, sender = up, down
    else:
        sender = _connect(host, port, deadline)
        receiver = _connect(host, port + 1, deadline)
    start = time.monotonic()
    for s in (sender, receiver):
        s.settimeout(max(1.0, deadline - time.monotonic()))
    threads = [
        threading.Thread(target=_send, args=(sender, payload)),
        threading.Thread(target=_recv, args=(receiver, received)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recv, ok = check_payload(b"".join(received))
    return {"sent": size, "recv": recv, "md5_ok": ok and recv == size,
            "elapsed": round(time.monotonic() - start, 3)}  # fmt: skip


def _one_way(
    mode: str, host: str, port: int, flow: str, payload: bytes, deadline: float
) -> dict[str, object]:
    if mode == "server":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, port))
            ls.listen(1)
            ls.settimeout(max(1.0, deadline - time.monotonic()))
            print(json.dumps({"listening": port}), flush=True)
            sock, _ = ls.accept()
    else:
        sock = _connect(host, port, deadline)
    sock.settimeout(max(1.0, deadline - time.monotonic()))
    start = time.monotonic()
    size = len(payload) - TRAILER
    if flow == "send":
        _send(sock, payload)
        return {"sent": size, "recv": 0, "md5_ok": None,
                "elapsed": round(time.monotonic() - start, 3)}  # fmt: skip
    received: list[bytes] = []
    _recv(sock, received)
    recv, ok = check_payload(b"".join(received))
    return {"sent": 0, "recv": recv, "md5_ok": ok,
            "elapsed": round(time.monotonic() - start, 3)}  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("host", help="address to bind (server) or connect to (client)")
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--size", type=int, default=8 << 20)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--flow", choices=["both", "recv", "send"], default="both")
    args = parser.parse_args(argv)
    result = run(args.mode, args.host, args.port, args.size, args.timeout, args.flow)
    print(json.dumps(result), flush=True)
    return 0 if result["md5_ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
