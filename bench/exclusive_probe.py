#!/usr/bin/env python3
"""Does EPOLLEXCLUSIVE stop the herd on a listener shared by processes?

Two processes share one listening socket; 300 connections arrive one at
a time.  Each process watches the listener either directly in its epoll
fd or through a small epoll fd of its own nested in its main one (what a
libev loop could watch), with or without EPOLLEXCLUSIVE.  Printed per
process: wake-ups / accepted / failed accepts (EAGAIN).

Measured 2026-12-05 (2 cores, loaded): direct + exclusive: no failed
accept, but 288/12 accepted (the first idle waiter takes nearly all);
nested + exclusive: as many failed accepts as nested without it (38/86
and 76/16 against 46/64): the kernel counts an exclusive wake-up only
when a task sleeps in epoll_wait on that very epoll fd, which a nested
one never has, so every worker's outer loop is woken anyway.

Usage: bench/exclusive_probe.py [plain-direct|excl-direct|plain-nested|excl-nested ...]
"""

import os
import select
import socket
import sys
import time

CONNS = 300
WORKERS = 2


def worker(lst: socket.socket, mode: str, out: int) -> None:
    flag = select.EPOLLIN | (select.EPOLLEXCLUSIVE if mode.startswith("excl") else 0)
    inner = None
    if mode.endswith("nested"):
        inner = select.epoll()
        inner.register(lst.fileno(), flag)
        outer = select.epoll()
        outer.register(inner.fileno(), select.EPOLLIN)
    else:
        outer = select.epoll()
        outer.register(lst.fileno(), flag)
    wakes = got = failed = 0
    end = time.monotonic() + 4
    while time.monotonic() < end:
        if outer.poll(0.2):
            wakes += 1
            if inner is not None:
                inner.poll(0)
            try:
                conn, _ = lst.accept()
                conn.close()
                got += 1
            except BlockingIOError:
                failed += 1
    os.write(out, f"{wakes}/{got}/{failed} ".encode())


def one(mode: str) -> str:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(128)
    lst.setblocking(False)
    port = lst.getsockname()[1]
    r, w = os.pipe()
    pids = []
    for _ in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                worker(lst, mode, w)
            finally:
                os._exit(0)
        pids.append(pid)
    time.sleep(0.3)
    for _ in range(CONNS):
        socket.create_connection(("127.0.0.1", port)).close()
        time.sleep(0.005)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    text = os.read(r, 1000).decode().strip()
    os.close(r)
    lst.close()
    return text


def main() -> int:
    for mode in sys.argv[1:] or ["plain-direct", "excl-direct", "plain-nested", "excl-nested"]:
        print(f"{mode:13} wake-ups/accepted/failed per process, {CONNS} connections: {one(mode)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
