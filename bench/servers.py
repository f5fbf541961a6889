"""Tiny loopback servers the benchmark runs as separate processes.

``greeter PORT``: accepts every connection, sends one greeting line at once
(so a client can measure time to first byte, and the idle-memory benchmark
can tell that a connection went all the way through the proxy), then holds
the connection until the client closes it.  It prints ``ready`` on stdout
once it listens.  A separate process (pinned to the load core by the
caller) keeps its work off the proxy's core and out of the client's timing.
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys

GREETING = b"hello\n"


def raise_fd_limit() -> None:
    """Holding thousands of connections needs more than the default 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def greeter(port: int) -> None:
    """Serve forever: greet, hold, close when the client does."""
    raise_fd_limit()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                _accept_all(lsock, sel)
            else:
                _drain(key.fileobj, sel)


def _accept_all(lsock: socket.socket, sel: selectors.BaseSelector) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # out of fds or aborted: the next event retries
        conn.setblocking(False)
        try:
            conn.send(GREETING)
        except OSError:
            conn.close()
            continue
        sel.register(conn, selectors.EVENT_READ, "client")


def _drain(conn: socket.socket, sel: selectors.BaseSelector) -> None:
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        sel.unregister(conn)
        conn.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "greeter":
        print("usage: servers.py greeter PORT", file=sys.stderr)
        return 64
    try:
        greeter(int(argv[2]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
