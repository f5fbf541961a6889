"""Detaching from the terminal, with errors still reported to the caller.

``balance`` without ``-f`` must return to the shell at once, yet a bad
port or an address in use must still print its message and exit non-zero.
So the parent forks, the grandchild (in a new session) does all the set-up
and reports one line through a pipe: ``0`` when serving, or an exit code
and message.  The parent prints the message and exits with that code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from gbalance.errors import EX_SOFTWARE

Report = Callable[[int, str], None]


def detach() -> Report:
    """Fork into the background; return the grandchild's ``report`` function.

    Must run before any gevent hub exists (libev does not survive fork
    without re-initialisation).  The calling (parent) process never returns.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        os.waitpid(pid, 0)
        _parent_wait(r)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(os.umask(0o022) | 0o022)   # at least 022; a stricter one (077) is kept

    def report(code: int, message: str = "") -> None:
        try:
            os.write(w, f"{code}\n{message}".encode("utf-8", "replace"))
        except OSError:
            pass
        os.close(w)
        if code == 0:
            _close_stdio()

    return report


def _parent_wait(r: int) -> None:
    """Relay the daemon's start-up verdict and exit with it."""
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    text = b"".join(chunks).decode("utf-8", "replace")
    head, _, message = text.partition("\n")
    try:
        code = int(head)
    except ValueError:
        code, message = EX_SOFTWARE, "the daemon died during start-up"
    if message:
        sys.stderr.write(f"balance: {message}\n")
        sys.stderr.flush()
    os._exit(code)


def _close_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
