"""BalanceServer in-process: its own accept loop (gbalance.server._do_read)."""

from __future__ import annotations

import errno
import socket
from conftest import free_port, green_read_until, inprocess_server


class FailingOnce:
    """Wraps the listening socket: its first ``_accept`` raises ``error``, then
    every call goes to the real socket (as does everything else)."""

    def __init__(self, real, error: OSError):
        self._real = real
        self._error = error
        self.calls = 0

    def _accept(self):
        self.calls += 1
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._real._accept()

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_unexpected_accept_error_logs_one_line_and_accepting_resumes(tmp_path, monkeypatch, backends, capfd):
    """An accept error that is neither "try again", nor out of descriptors, nor
    about one client (here EBADF, once) logs exactly one line
    "accept failed (...); pausing new connections", prints no traceback, does
    not close the server, and accepting resumes: the waiting client is served."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("OK")
    port = free_port()
    with inprocess_server(["-f", str(port), be.spec], tmp_path / "state") as (master, server):
        wrapper = FailingOnce(server.socket, OSError(errno.EBADF, "Bad file descriptor"))
        server.socket = wrapper
        capfd.readouterr()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert green_read_until(client, b"\n") == b"OK\n"
        assert wrapper.calls >= 2                   # the failed accept, then the good one
        assert not server.paused and not server.closed
        # A second client is accepted at once, with no further error.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            assert green_read_until(second, b"\n") == b"OK\n"
    out, err = capfd.readouterr()
    text = out + err
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "accept failed" in line]
    assert lines == ["balance: accept failed (Bad file descriptor); pausing new connections"], text
    assert "pausing new connections" not in text.replace(lines[0], "", 1), text
