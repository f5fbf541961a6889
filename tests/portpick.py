"""Listening ports outside the kernel's ephemeral range.

``conftest.free_port`` asks the kernel for a free port, which comes from
the ephemeral range (32768-60999 here); when other suites or a benchmark
make many outgoing connections at the same time, such a port can be taken
as a local port before balance binds it, and the start fails with
"Address already in use".  Ports below the range are never handed out for
outgoing connections, so picking one there (and checking it binds) only
races with another explicit bind.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def quiet_port() -> int:
    """A port in 20000-32000 that is free on IPv4 and IPv6 right now."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(LOW, HIGH)
        if _bindable(port):
            return port
    raise RuntimeError("no free port in 20000-32000")
