"""systemd readiness: ``READY=1`` only once the port accepts connections,
``STOPPING=1`` when draining starts, nothing when start-up fails.

A real ``AF_UNIX`` datagram socket stands in for systemd; the real
``balance`` command runs as a subprocess.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
import uuid

import pytest

from conftest import closing_factory, free_port, listening, pid_alive, read_line
from gbalance.system.notify import NOTIFY_ENV, notify, send, socket_address
from gbalance.table.files import state_path
from gbalance.table.state import SharedState


class FakeSystemd:
    """A notify socket: a path in a temp dir or an abstract name."""

    def __init__(self, tmp_path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"gbalance-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            self.env_value = path

    def receive(self, timeout: float) -> str | None:
        """The next message, or None if none comes within ``timeout``."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    """Factory for :class:`FakeSystemd` objects, all closed after the test."""
    yield from closing_factory(lambda abstract=False: FakeSystemd(tmp_path, abstract))


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if line)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_only_once_listening_then_stopping(balance, backends, systemd, abstract):
    be = backends("R")
    sd = systemd(abstract)
    port = free_port()
    balance.env["NOTIFY_SOCKET"] = sd.env_value
    proc = balance.start(str(port), be.spec, port=port, wait=False)
    message = sd.receive(20)
    assert message is not None, "no READY=1"
    # Checked the moment READY arrives: the port must already accept.
    assert listening(port) and accepts(port)
    f = fields(message)
    assert f == {"READY": "1", "MAINPID": str(proc.pid)}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == "R"
    os.kill(proc.pid, signal.SIGTERM)
    assert fields(sd.receive(10) or "") == {"STOPPING": "1"}
    out, err = proc.p.communicate(timeout=10)      # exits by itself: nothing is open
    assert proc.p.returncode == 0, err
    assert sd.receive(0.2) is None                  # nothing more


def test_daemon_sends_ready_from_the_detached_master(balance, backends, systemd):
    be = backends("D")
    sd = systemd()
    port = free_port()
    balance.env["NOTIFY_SOCKET"] = sd.env_value
    r = balance.run(str(port), be.spec, timeout=30)
    assert r.returncode == 0, r.stderr
    st = SharedState.attach(state_path(port, None, str(balance.state_dir)))
    pid = st.pid
    st.close()
    balance.daemon_pids.append(pid)               # killed at the end whatever happens
    message = sd.receive(10)
    assert message is not None
    assert fields(message) == {"READY": "1", "MAINPID": str(pid)}
    assert accepts(port)
    os.kill(pid, signal.SIGTERM)
    assert fields(sd.receive(10) or "") == {"STOPPING": "1"}
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "daemon"])
def test_no_ready_when_the_port_is_taken(balance, backends, systemd, foreground):
    be = backends("X")
    sd = systemd()
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    balance.env["NOTIFY_SOCKET"] = sd.env_value
    try:
        args = (["-f"] if foreground else []) + [str(port), be.spec]
        r = balance.run(*args, timeout=30)
    finally:
        busy.close()
    assert r.returncode == 71
    assert "Address already in use" in r.stderr and "Traceback" not in r.stderr
    assert sd.receive(0.5) is None


def test_replacement_reports_ready_with_its_own_pid(balance, backends, systemd):
    be = backends("N")
    sd = systemd()
    port = free_port()
    balance.env["NOTIFY_SOCKET"] = sd.env_value
    old = balance.start(str(port), be.spec, port=port)
    assert fields(sd.receive(10) or "") == {"READY": "1", "MAINPID": str(old.pid)}
    new = balance.start("-r", str(port), be.spec, port=port, wait=False)
    assert fields(sd.receive(15) or "") == {"READY": "1", "MAINPID": str(new.pid)}
    old.p.wait(10)
    assert old.p.returncode == 0
    assert sd.receive(0.3) is None                  # the replaced master says no STOPPING


def test_notify_never_raises_or_waits(monkeypatch, tmp_path):
    import gbalance.system.notify as mod

    for value in ("", "relative/path", str(tmp_path / "missing.sock"), "@"):
        monkeypatch.setattr(mod, "_address", mod._UNSET)
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        start = time.monotonic()
        assert notify("READY=1\n") is False
        assert time.monotonic() - start < 0.5
        assert "NOTIFY_SOCKET" not in os.environ     # children never see it


@pytest.mark.parametrize("abstract", [False, True])
def test_send_reaches_the_address_a_value_names_and_leaves_the_environment(systemd, monkeypatch, abstract):
    """balance-instances' reload command shares the sender: it reads its own
    $NOTIFY_SOCKET without unsetting it (the balance -r it runs needs it too)."""
    sd = systemd(abstract)
    monkeypatch.setenv(NOTIFY_ENV, sd.env_value)
    assert send(socket_address(os.environ[NOTIFY_ENV]), "MAINPID=42\nREADY=1\n", timeout=1.0)
    assert fields(sd.receive(2.0)) == {"MAINPID": "42", "READY": "1"}
    assert os.environ[NOTIFY_ENV] == sd.env_value
    assert [socket_address(v) for v in ("", "@", "relative/sock", "/run/x")] == [None, None, None, "/run/x"]
    assert send(None, "READY=1\n") is False
