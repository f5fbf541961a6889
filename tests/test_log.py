"""Log lines on the journal stream carry their syslog priority (gbalance/log.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

from conftest import BALANCE, ROOT, free_port, wait_listening
from test_e2e_proxy import syslog_socket  # noqa: F401  (the fixture: our own /dev/log)


def run_master(tmp_path, journal: bool) -> list[str]:
    """A real foreground master whose stderr is a file; JOURNAL_STREAM names it (or not)."""
    port = free_port()
    dead = free_port()   # nothing listens there: the connect is refused
    err_path = tmp_path / f"stderr-{journal}"
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        # Not the journal: another inode (as when stderr was redirected after systemd set it).
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino if journal else st.st_ino + 1}"
        p = subprocess.Popen(BALANCE + ["-f", "-a", "-d", "-b", "127.0.0.1", str(port), f"127.0.0.1:{dead}"],
                             env=env, stderr=err, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_listening(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(10) == b""   # no channel could take it
        deadline = time.monotonic() + 10
        while "enabled manually" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        p.terminate()
        p.wait(timeout=40)
    return err_path.read_text().splitlines()


def test_stderr_lines_carry_priorities_under_journal_stream(tmp_path):
    lines = run_master(tmp_path, journal=True)
    assert lines and all(line[:1] == "<" and line[2] == ">" for line in lines), lines
    assert "<4>connection failed group 0 channel 0" in lines, lines
    assert any(line.startswith("<4>") and "needs to be enabled manually" in line for line in lines), lines
    assert any(line.startswith("<6>master on port ") for line in lines), lines
    debug = [line for line in lines if line.startswith("<7>")]
    assert any("trying group 0 channel 0" in line for line in debug), lines
    assert not any("balance: " in line[:12] for line in lines)


def test_plain_stderr_without_journal(tmp_path):
    lines = run_master(tmp_path, journal=False)
    assert "balance: connection failed group 0 channel 0" in lines, lines
    assert any(line.startswith("balance: master on port ") for line in lines), lines
    assert not any(line.startswith("<") for line in lines), lines


def test_start_up_errors_are_err_priority(tmp_path):
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        done = subprocess.run(BALANCE + ["-x", "80"], env=env, stderr=err, timeout=30, cwd=ROOT)
    assert done.returncode == 64
    lines = err_path.read_text().splitlines()
    assert lines[0] == "<3>unknown option -x" and all(line.startswith("<3>") for line in lines), lines


def test_detached_master_logs_to_syslog_with_priorities(balance, syslog_socket):  # noqa: F811  (the fixture)
    """Detached: syslog datagrams "<PRI>... balance[pid]: ..." with facility daemon and each line's severity."""
    import re
    import signal

    from conftest import pid_alive

    prefix, messages = syslog_socket
    dead, port = free_port(), free_port()
    r = subprocess.run(prefix + BALANCE + ["-a", "-b", "127.0.0.1", str(port), f"127.0.0.1:{dead}"], env=balance.env,
                       capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(10) == b""
    # Where no syslog daemon runs, /dev/log is the host's: other programs'
    # lines (another test's daemon, su, ...) may come too.  This daemon is the
    # one that names this test's dead backend; only its lines count.
    ours = f"127.0.0.1:{dead} needs to be enabled manually"
    deadline = time.monotonic() + 10
    while not any(ours in m for m in messages()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(re.search(r"balance\[(\d+)\]", next(m for m in messages() if ours in m)).group(1))
    balance.daemon_pids.append(pid)
    os.kill(pid, signal.SIGTERM)
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    by_text = {}
    for m in messages():
        if f"balance[{pid}]" not in m:
            continue
        got = re.match(r"<(\d+)>.*?balance\[(\d+)\]: (.*)", m, re.S)
        assert got, m
        by_text[got.group(3).strip()] = int(got.group(1))
    daemon = 3 << 3   # LOG_DAEMON
    assert by_text["connection failed group 0 channel 0"] == daemon | 4            # warning
    assert by_text[f"master on port {port} shut down"] == daemon | 6               # info
