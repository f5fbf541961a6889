"""``balance-instances health`` (gbalance/service/health.py): keepalived's check of /etc/balance.conf.

The real helper runs as a subprocess against a private config file and
state directory; the masters are real ``balance -f`` processes on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, eventually, free_port, listening

from gbalance.service import health
from gbalance.table.files import state_path
from gbalance.table.layout import C_TOTALC
from gbalance.table.state import SharedState


def run_health(balance, tmp_path: Path, conf_text: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "balance.conf"
    conf.write_text(conf_text)
    env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(balance.state_dir))
    return subprocess.run([sys.executable, "-m", "gbalance.service.instances", "health"], env=env, timeout=30,
                          capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)


def two_masters(balance, backends) -> tuple[list[int], list, str]:
    back = backends("A")
    ports = [free_port(), free_port()]
    procs = [balance.start("-b", "127.0.0.1", str(p), back.spec, port=p) for p in ports]
    conf = "".join(f"-b 127.0.0.1 {p} {back.spec}\n" for p in ports)
    return ports, procs, conf, back


def test_healthy_when_every_instance_listens_and_nothing_is_touched(balance, backends, tmp_path):
    ports, procs, conf, back = two_masters(balance, backends)
    done = run_health(balance, tmp_path, "# two proxies\n" + conf)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # No side effects: no connection reached the proxies or the backend.
    assert back.connections == 0
    for p in ports:
        st = SharedState.attach(state_path(p, "127.0.0.1", str(balance.state_dir)))
        try:
            assert st.counter(0, 0, C_TOTALC) == 0
        finally:
            st.close()


def test_unhealthy_when_one_instance_is_down(balance, backends, tmp_path):
    ports, procs, conf, back = two_masters(balance, backends)
    procs[1].stop(signal.SIGKILL)
    done = run_health(balance, tmp_path, conf)
    assert done.returncode == 1
    assert f"balance {ports[1]}.127.0.0.1: not running" in done.stderr
    assert str(ports[0]) not in done.stderr


def test_unhealthy_when_an_instance_was_never_started(balance, backends, tmp_path):
    ports, procs, conf, back = two_masters(balance, backends)
    other = free_port()
    done = run_health(balance, tmp_path, conf + f"{other} {back.spec}\n")
    assert done.returncode == 1
    assert done.stderr.strip() == f"balance {other}.any: not running (no state file)"


def test_unhealthy_while_the_master_is_stopped(balance, backends, tmp_path):
    ports, procs, conf, back = two_masters(balance, backends)
    os.kill(procs[0].pid, signal.SIGSTOP)
    try:
        done = run_health(balance, tmp_path, conf)
        assert done.returncode == 1 and "is stopped" in done.stderr
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
    assert run_health(balance, tmp_path, conf).returncode == 0


def test_unhealthy_once_a_draining_master_closed_its_listener(balance, backends, tmp_path):
    ports, procs, conf, back = two_masters(balance, backends)
    os.kill(procs[0].pid, signal.SIGTERM)     # drain: stops accepting at once
    assert eventually(lambda: not listening(ports[0]), 10)
    assert run_health(balance, tmp_path, conf).returncode == 1


def test_health_of_workers(balance, backends, tmp_path):
    back = backends("A")
    port = free_port()
    balance.start("-w", "2", "-b", "127.0.0.1", str(port), back.spec, port=port)
    assert run_health(balance, tmp_path, f"-w 2 -b 127.0.0.1 {port} {back.spec}\n").returncode == 0


def test_no_instances_or_no_file(balance, tmp_path):
    done = run_health(balance, tmp_path, "# nothing\n")
    assert done.returncode == 1 and "no instances configured" in done.stderr
    env = dict(os.environ, BALANCE_CONF=str(tmp_path / "missing.conf"),
               BALANCE_STATE_DIR=str(balance.state_dir))
    done = subprocess.run([sys.executable, "-m", "gbalance.service.instances", "health"], env=env, timeout=30,
                          capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 78 and "cannot read" in done.stderr and "Traceback" not in done.stderr


# -- the pieces, on real processes and hostile /proc text ---------------------------------

def test_listeners_parse_the_kernel_table_and_skip_junk(tmp_path):
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000080:00000003 00:00000000 00000000     0        0 4242 1\n"
        "   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n"
        "   2: garbage\n"
        "   3: 0100007F:ZZZZ 00000000:0000 0A 00000080:00000000 00:00000000 00000000     0        0 9 1\n")
    assert health.proc_listeners((str(table), str(tmp_path / "absent")), backlog=100) == \
        [health.Listener(port=0x1F90, inode=4242, queued=3, backlog=100)]


def test_netlink_sees_what_proc_shows_with_the_backlog_and_a_full_queue():
    """sock_diag agrees with /proc/net/tcp, and tells the backlog and a full queue."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]
    clients = []
    try:
        mine = [s for s in health.listeners() if s.port == port]
        assert [(s.queued, s.backlog) for s in mine] == [(0, 2)]
        assert mine[0].inode == os.fstat(srv.fileno()).st_ino
        assert {(s.port, s.inode) for s in health.listeners()} == \
            {(s.port, s.inode) for s in health.proc_listeners()}
        for _ in range(5):      # nobody accepts: the kernel queues 3 (backlog + 1), drops the rest
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            clients.append(c)
        assert eventually(lambda: [s.queued for s in health.listeners() if s.port == port] == [3], 5)
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_check_needs_the_masters_own_listener_with_room(balance, backends, monkeypatch):
    monkeypatch.setenv("BALANCE_STATE_DIR", str(balance.state_dir))
    back = backends("A")
    port = free_port()
    balance.start("-b", "127.0.0.1", str(port), back.spec, port=port)
    key = f"{port}.127.0.0.1"
    real = [s for s in health.listeners() if s.port == port]
    assert len(real) == 1 and health.check(key, port, real) == ""
    # Someone else's socket on the port is not the master's.
    assert "does not hold" in health.check(key, port, [health.Listener(port, 1, 0, 128)])
    assert "nothing listens" in health.check(key, port, [])
    full = health.Listener(port, real[0].inode, 129, 128)
    assert "accept queue full" in health.check(key, port, [full])
    assert health.check(key, port, [health.Listener(port, real[0].inode, 128, 128)]) == ""


def test_accept_limit(tmp_path):
    import socket
    from gbalance.system.limits import LISTEN_BACKLOG
    f = tmp_path / "somaxconn"
    f.write_text("128\n")
    assert health.accept_limit(str(f)) == 128
    f.write_text("20000\n")          # raised by the administrator: the master gets it all
    assert health.accept_limit(str(f)) == 20000
    f.write_text("1000000\n")        # above what a master asks for
    assert health.accept_limit(str(f)) == LISTEN_BACKLOG
    f.write_text("junk")
    assert health.accept_limit(str(f)) == min(socket.SOMAXCONN, LISTEN_BACKLOG)
    assert health.accept_limit(str(tmp_path / "absent")) == min(socket.SOMAXCONN, LISTEN_BACKLOG)
