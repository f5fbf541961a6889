"""BalanceServer in-process: its own accept loop (gbalance.server._do_read)."""

from __future__ import annotations

import errno
import socket
import time

import gevent

from conftest import free_port


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
    from gbalance.cli import parse
    from gbalance.log import Log
    from gbalance.master import Master

    monkeypatch.setenv("BALANCE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("OK")
    port = free_port()
    master = Master(parse(["-f", str(port), be.spec]), Log(foreground=True))
    master.build()
    master.listener.listen(16)
    server = master.server
    server.start()
    wrapper = FailingOnce(server.socket, OSError(errno.EBADF, "Bad file descriptor"))
    server.socket = wrapper
    capfd.readouterr()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server.loop.update_now()       # a hub left idle by earlier tests: its clock is stale
    try:
        client.settimeout(0)
        deadline = time.monotonic() + 5
        data = b""
        while b"\n" not in data and time.monotonic() < deadline:
            gevent.sleep(0.01)
            try:
                data += client.recv(100)
            except BlockingIOError:
                pass
        assert data == b"OK\n"
        assert wrapper.calls >= 2                   # the failed accept, then the good one
        assert not server.paused and not server.closed
        # A second client is accepted at once, with no further error.
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        with second:
            second.settimeout(0)
            got = b""
            deadline = time.monotonic() + 5
            while b"\n" not in got and time.monotonic() < deadline:
                gevent.sleep(0.01)
                try:
                    got += second.recv(100)
                except BlockingIOError:
                    pass
            assert got == b"OK\n"
    finally:
        client.close()
        server.reset_all()
        server.stop_timers()
        server.close()
        master.remove_state()
    out, err = capfd.readouterr()
    text = out + err
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "accept failed" in line]
    assert lines == ["balance: accept failed (Bad file descriptor); pausing new connections"], text
    assert "pausing new connections" not in text.replace(lines[0], "", 1), text
