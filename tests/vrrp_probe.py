"""Helpers run inside the network namespaces of test_e2e_keepalived.py.

``backend PORT``: a TCP server on every address that answers each
connection with ``ok`` and closes; prints ``ready`` once it listens and
serves until killed.

``client HOST PORT SECONDS``: starts a connection to HOST:PORT every 10 ms
for SECONDS (each in its own thread, 1 s timeout, success = ``ok`` read),
then prints one JSON list of ``[start, end, ok]`` (CLOCK_MONOTONIC, which
every namespace shares).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

PERIOD = 0.010
TIMEOUT = 1.0


def backend(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            conn.sendall(b"ok\n")
        except OSError:
            pass
        conn.close()


def attempt(host: str, port: int, out: list, i: int) -> None:
    start = time.monotonic()
    ok = False
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.settimeout(TIMEOUT)
            ok = s.recv(3) == b"ok\n"
    except OSError:
        pass
    out[i] = [start, time.monotonic(), ok]


def client(host: str, port: int, seconds: float) -> None:
    count = int(seconds / PERIOD)
    out: list = [None] * count
    threads = []
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i * PERIOD - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=attempt, args=(host, port, out, i), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(TIMEOUT * 3)
    print(json.dumps([r for r in out if r is not None]))


if __name__ == "__main__":
    if sys.argv[1] == "backend":
        backend(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
