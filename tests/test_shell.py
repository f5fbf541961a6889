"""The control shell (``balance -i`` / ``balance -c``) against real masters.

Every test starts a real master (``balance -f``) with real backends on
loopback, drives the shell as a subprocess and checks both the exact text
the shell prints and what the change does to routing.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gbalance.table.files import StateError, state_path
from gbalance.table.layout import SOFT_DISABLED
from gbalance.table.state import SharedState

import otheruser
from conftest import BALANCE, ROOT, free_port, pid_alive, read_tag

HEADER = "GRP Type  #   S       ip-address  port    c      totalc maxc        sent        rcvd"


def row(g: int, kind: str, c: int, status: str, addr: str, port: int, cur: int = 0,
        totalc: int = 0, maxc: int = 0, sent: int = 0, rcvd: int = 0, width: int = 16) -> str:
    """One ``show`` row, written with the C format string of balance."""
    fmt = "%3d %4s %2d %3s %" + str(width) + "s %5d %4d %11u %4d %11u %11u"
    return fmt % (g, kind, c, status, addr, port, cur, totalc, maxc, sent, rcvd)


def table(*rows: str, width: int = 16) -> str:
    header = HEADER if width == 16 else HEADER.replace("      ip-address", "ip-address".rjust(width))
    return "\n".join([header, *rows]) + "\n"


def ctl(balance, port: int, command: str, *opts: str) -> str:
    """``balance -c command port``: must exit 0 and print nothing on stderr."""
    r = balance.run(*opts, "-c", command, str(port), timeout=20)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stderr == ""
    return r.stdout


def session(balance, port: int, lines: list[str], *opts: str) -> subprocess.CompletedProcess:
    """``balance -i port`` with ``lines`` on stdin (no tty)."""
    text = "".join(line + "\n" for line in lines)
    return balance.run(*opts, "-i", str(port), input=text, timeout=20)


def transcript(pid: int, pairs: list[tuple[str, str]], group_after: list[int] | None = None) -> str:
    """Expected ``-i`` output: banner, then each prompt followed by its answer."""
    out = f"\nbalance 1.0.0 (gbalance) interactive command shell\nPID of master process is {pid}\n\n"
    groups = group_after or [0] * (len(pairs) + 1)
    for i, (_, answer) in enumerate(pairs):
        out += f"balance[{groups[i]}] " + answer
    return out + f"balance[{groups[len(pairs)]}] \n"


def rows_of(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()[1:]]


def channels(balance, port: int, bind: str | None = None) -> list:
    """The master's table read directly (cheaper than a ``-c show`` per poll)."""
    st = SharedState.attach(state_path(port, bind, str(balance.state_dir)))
    try:
        return list(st.channels())
    finally:
        st.close()


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_idle(balance, port: int, totalc: int, rcvd: int | None = None) -> None:
    """Wait until no connection is open, ``totalc`` attempts were counted
    and (if given) ``rcvd`` bytes were forwarded to clients in all."""
    def idle() -> bool:
        chans = channels(balance, port)
        return (all(ch.c == 0 for ch in chans) and sum(ch.totalc for ch in chans) == totalc
                and (rcvd is None or sum(ch.rcvd for ch in chans) == rcvd))
    wait_for(idle, f"{totalc} finished connections")


def listening(port: int) -> bool:
    """True if some socket listens on ``port`` (from /proc, without connecting)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def launch(balance, *args: str, port: int, rows: int):
    """Start a master without probing its port (a probe would be a routed connection).

    Ready means: ``show`` lists ``rows`` channels and the kernel reports the
    port in LISTEN state.
    """
    proc = balance.start(*args, port=port, wait=False)
    bind = args[1] if args[0] == "-b" else None
    path = state_path(port, bind, str(balance.state_dir))
    deadline = time.monotonic() + 10
    while not (table_rows(path) == rows and listening(port)):
        assert proc.p.poll() is None, proc.stop()
        assert time.monotonic() < deadline, f"master on port {port} not ready"
        time.sleep(0.01)
    return proc


def table_rows(path: str) -> int:
    """How many channels the master has written so far (-1: no table yet)."""
    try:
        st = SharedState.attach(path)
    except StateError:
        return -1
    try:
        return len(list(st.channels()))
    finally:
        st.close()


def tags(port: int, n: int, host: str = "127.0.0.1") -> list[str]:
    return [read_tag(port, host) for _ in range(n)]


@pytest.fixture
def two(balance, backends):
    """A master on a free port with channels A and B in group 0."""
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = launch(balance, str(port), a.spec, b.spec, port=port, rows=2)
    return port, proc, a, b


# -- finding the master --------------------------------------------------------


def test_no_master_process(balance):
    port = free_port()
    for args in (["-c", "show", str(port)], ["-i", str(port)]):
        r = balance.run(*args)
        assert r.returncode == 69
        assert r.stdout == ""
        assert r.stderr.startswith(f"balance: no master process on port {port} (no state file ")
        assert r.stderr.count("\n") == 1


def test_no_master_on_that_address_names_the_addresses_that_have_one(balance, backends):
    """``-c show PORT`` when only -b instances serve PORT says which -b to use;
    ``-b X`` when the master runs without -b says so too (one line, exit 69)."""
    a, b = backends("A"), backends("B", host="::1")
    port = free_port()
    v4 = launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    launch(balance, "-b", "::1", str(port), b.spec, port=port, rows=1)
    any_path = balance.state_dir / f"balance.{port}.any"
    r = balance.run("-c", "show", str(port))
    assert (r.returncode, r.stdout) == (69, "")
    assert r.stderr == (f"balance: no master process on port {port} (no state file {any_path});"
                        f" port {port} has masters with -b 127.0.0.1, with -b ::1\n")
    v4.stop()
    r = balance.run("-c", "show", str(port))
    assert r.stderr.endswith(f"; port {port} has a master with -b ::1\n") and r.returncode == 69
    assert ctl(balance, port, "show", "-b", "::1").startswith("GRP")
    other = free_port()
    launch(balance, str(other), a.spec, port=other, rows=1)
    r = balance.run("-b", "127.0.0.1", "-c", "show", str(other))
    assert r.returncode == 69
    assert r.stderr.endswith(f"; port {other} has a master without -b\n") and r.stderr.count("\n") == 1
    r = balance.run("-c", "show", str(free_port()))
    assert r.returncode == 69 and "has a master" not in r.stderr and "masters" not in r.stderr


def test_stale_state_file_is_no_master(balance, backends):
    a = backends("A")
    port = free_port()
    proc = launch(balance, str(port), a.spec, port=port, rows=1)
    proc.stop(signal.SIGKILL)          # no clean-up: the file stays, the lock is gone
    path = balance.state_dir / f"balance.{port}.any"
    assert path.exists()
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 69
    assert r.stderr == (f"balance: no master process on port {port} "
                        f"(stale state file {path}, pid {proc.pid} is gone)\n")
    # A new master takes the stale file over and the shell finds it.
    proc2 = launch(balance, str(port), a.spec, port=port, rows=1)
    assert f"PID of master process is {proc2.pid}\n" in session(balance, port, []).stdout


def test_banner_prompt_and_eof(two, balance):
    port, proc, a, b = two
    r = session(balance, port, [])
    assert r.returncode == 0
    assert r.stderr == ""
    assert r.stdout == transcript(proc.pid, [])


# -- show, counters, reset, mrtg -------------------------------------------------


def test_show_counts_and_bytes_then_reset_and_mrtg(balance, backends):
    a, b = backends("AAAA", mode="tag"), backends("BB", mode="tag")
    port = free_port()
    launch(balance, str(port), a.spec, f"{b.spec}:7", port=port, rows=2)
    for _ in range(3):  # client sends 5 bytes, reads the tag and the echo
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hello")
            want = 5 + 5 if s.recv(1) == b"A" else 3 + 5
            got = 1
            while got < want:
                got += len(s.recv(100))
    wait_idle(balance, port, 3, rcvd=28)   # byte counters are added as forwarders finish
    assert ctl(balance, port, "show") == table(
        row(0, "RR", 0, "ENA", "127.0.0.1", a.port, 0, 2, 0, 10, 20),
        row(0, "RR", 1, "ENA", "127.0.0.1", b.port, 0, 1, 7, 5, 8))
    assert ctl(balance, port, "mrtg-bytes 0 0") == f"20\n10\nUNKNOWN\ngroup 0 channel 0\n"
    assert ctl(balance, port, "mrtg-conns 0 0") == "2\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n"
    assert ctl(balance, port, "mrtg-bytes 0 1") == f"8\n5\nUNKNOWN\ngroup 0 channel 1\n"
    assert ctl(balance, port, "reset 0") == "channel 0 counters reset\n"
    assert ctl(balance, port, "mrtg-bytes 0 0") == "0\n0\nUNKNOWN\ngroup 0 channel 0\n"
    assert ctl(balance, port, "mrtg-conns 0 0") == "0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n"
    assert ctl(balance, port, "show") == table(
        row(0, "RR", 0, "ENA", "127.0.0.1", a.port, 0, 0, 0, 0, 0),
        row(0, "RR", 1, "ENA", "127.0.0.1", b.port, 0, 1, 7, 5, 8))


def test_show_widens_only_for_long_ipv6(balance, backends):
    a = backends("A")
    port = free_port()
    launch(balance, str(port), a.spec, port=port, rows=1)
    long6 = "2001:db8:1234:5678:9abc:def0:1234:5678"   # never connected to: it stays disabled
    assert ctl(balance, port, "create ::1 8080") == "channel created\n"
    assert ctl(balance, port, "show") == table(
        row(0, "RR", 0, "ENA", "127.0.0.1", a.port), row(0, "RR", 1, "DIS", "::1", 8080))
    assert ctl(balance, port, f"create [{long6}] 443") == "channel created\n"
    w = len(long6)
    assert ctl(balance, port, "show") == table(
        row(0, "RR", 0, "ENA", "127.0.0.1", a.port, width=w),
        row(0, "RR", 1, "DIS", "::1", 8080, width=w),
        row(0, "RR", 2, "DIS", long6, 443, width=w), width=w)


# -- changes and their effect on routing ------------------------------------------------


def test_disable_enable_changes_routing(two, balance):
    port, proc, a, b = two
    assert tags(port, 4) == ["A", "B", "A", "B"]
    assert ctl(balance, port, "disable 0") == "channel 0 disabled\n"
    assert ctl(balance, port, "disable 0") == "channel 0 already disabled\n"
    assert tags(port, 4) == ["B"] * 4
    assert rows_of(ctl(balance, port, "show"))[0][3] == "DIS"
    assert ctl(balance, port, "enable 0") == "channel 0 enabled\n"
    assert ctl(balance, port, "enable 0") == "channel 0 already enabled\n"
    got = tags(port, 4)
    assert sorted(got) == ["A", "A", "B", "B"] and got[0] != got[1]


def test_disabled_channel_keeps_open_connections(two, balance):
    port, proc, a, b = two
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(2) == b"A\n"
        assert ctl(balance, port, "disable 0") == "channel 0 disabled\n"
        assert tags(port, 2) == ["B", "B"]
        s.sendall(b"still here")
        assert s.recv(100) == b"still here"


def test_create_then_enable_gets_traffic(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    launch(balance, str(port), a.spec, port=port, rows=1)
    assert ctl(balance, port, f"create localhost {b.port}") == "channel created\n"
    assert ctl(balance, port, "show") == table(row(0, "RR", 0, "ENA", "127.0.0.1", a.port),
                                               row(0, "RR", 1, "DIS", "127.0.0.1", b.port))
    assert tags(port, 3) == ["A"] * 3      # created hard-disabled
    assert ctl(balance, port, "enable 1") == "channel 1 enabled\n"
    got = tags(port, 4)
    assert sorted(got) == ["A", "A", "B", "B"] and got[0] != got[1]


def test_create_in_a_new_failover_group(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    launch(balance, str(port), a.spec, port=port, rows=1)
    r = session(balance, port, ["group 1", f"create 127.0.0.1 {b.port}", "enable 0", "group 0",
                                "disable 0"])
    assert r.stdout.endswith("balance[0] unknown group\nbalance[1] channel created\n"
                             "balance[1] channel 0 enabled\n"
                             "balance[1] balance[0] channel 0 disabled\nbalance[0] \n")
    assert tags(port, 2) == ["B", "B"]      # group 0 has nothing left: failover to group 1


def test_assign_repoints_a_disabled_channel(two, balance, backends):
    port, proc, a, b = two
    c = backends("C")
    assert ctl(balance, port, f"assign 0 127.0.0.1 {c.port}") == \
        "channel must be disabled to assign new address\n"
    assert ctl(balance, port, "disable 0") == "channel 0 disabled\n"
    assert ctl(balance, port, f"assign 0 127.0.0.1 {c.port}") == "channel reassigned\n"
    assert ctl(balance, port, "enable 0") == "channel 0 enabled\n"
    assert sorted(tags(port, 4)) == ["B", "B", "C", "C"]
    assert a.connections == 0
    assert rows_of(ctl(balance, port, "show"))[0][4:6] == ["127.0.0.1", str(c.port)]


def test_maxc_limits_a_channel(two, balance):
    port, proc, a, b = two
    assert ctl(balance, port, "maxc 0 1") == "maxc of channel 0 changed to 1\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
        assert held.recv(2) == b"A\n"
        assert tags(port, 3) == ["B"] * 3      # channel 0 is full
        rows = rows_of(ctl(balance, port, "show"))
        assert rows[0][6:9] == ["1", "1", "1"]  # c, totalc, maxc
    wait_idle(balance, port, 4)
    assert ctl(balance, port, "maxc 0 0") == "maxc of channel 0 changed to 0\n"
    assert sorted(tags(port, 2)) == ["A", "B"]


def test_hash_and_rr(two, balance):
    port, proc, a, b = two
    assert ctl(balance, port, "hash") == "group 0 set to hash\n"
    assert rows_of(ctl(balance, port, "show"))[0][1] == "Hash"
    got = tags(port, 6)
    assert len(set(got)) == 1               # one client address, one channel
    assert ctl(balance, port, "rr") == "group 0 set to round robin\n"
    got = tags(port, 4)
    assert sorted(got) == ["A", "A", "B", "B"] and got[0] != got[1]


def test_session_changes_group_and_prompt(two, balance):
    port, proc, a, b = two
    r = session(balance, port, ["group 1", "hash", "group 0", "rr"])
    assert r.returncode == 0
    assert r.stdout == transcript(proc.pid, [("group 1", "unknown group\n"),
                                             ("hash", "group 1 set to hash\n"),
                                             ("group 0", ""), ("rr", "group 0 set to round robin\n")],
                                  group_after=[0, 1, 1, 0, 0])


# -- kill ------------------------------------------------------------------------


def test_kill_with_c(two, balance):
    port, proc, a, b = two
    assert ctl(balance, port, "kill") == "shutdown complete, exiting.\n"
    assert not pid_alive(proc.pid)
    assert not (balance.state_dir / f"balance.{port}.any").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 69 and "no master process" in r.stderr


def test_kill_ends_interactive_session(two, balance):
    port, proc, a, b = two
    r = session(balance, port, ["kill", "show"])
    assert r.returncode == 0
    assert r.stdout == transcript(proc.pid, [("kill", "shutdown complete, exiting.\n")])[:-len("balance[0] \n")]
    assert not pid_alive(proc.pid)


def test_master_gone_during_session(two, balance):
    port, proc, a, b = two
    p = subprocess.Popen(BALANCE + ["-i", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT, env=balance.env)
    try:
        assert read_until(p.stdout.fileno(), b"balance[0] ").endswith(b"balance[0] ")
        proc.stop()
        out, err = p.communicate(b"show\n", timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 69
    assert err.decode() == f"balance: no master process on port {port} any more (pid {proc.pid} exited)\n"


# -- several instances -------------------------------------------------------------


def test_instances_by_port_and_bind_address_are_separate(balance, backends):
    a, b, c = backends("A"), backends("B"), backends("C")
    port = free_port()
    other = free_port()
    launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    launch(balance, "-b", "127.0.0.2", str(port), b.spec, port=port, rows=1)
    launch(balance, str(other), c.spec, port=other, rows=1)
    one = ctl(balance, port, "show", "-b", "127.0.0.1")
    two = ctl(balance, port, "show", "-b", "127.0.0.2")
    assert one == table(row(0, "RR", 0, "ENA", "127.0.0.1", a.port))
    assert two == table(row(0, "RR", 0, "ENA", "127.0.0.1", b.port))
    assert ctl(balance, other, "show") == table(row(0, "RR", 0, "ENA", "127.0.0.1", c.port))
    # Without -b there is no master on that port: the key is the bind address.
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 69 and "no master process" in r.stderr
    assert ctl(balance, port, "disable 0", "-b", "127.0.0.2") == "channel 0 disabled\n"
    assert read_tag(port, "127.0.0.1") == "A"
    assert read_tag(other) == "C"
    assert rows_of(ctl(balance, port, "show", "-b", "127.0.0.1"))[0][3] == "ENA"
    assert rows_of(ctl(balance, other, "show"))[0][3] == "ENA"


def test_ipv6_and_ipv4_instances_are_separate(balance, backends):
    a, b = backends("A"), backends("B", host="::1")
    port = free_port()
    launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    launch(balance, "-b", "::1", str(port), b.spec, port=port, rows=1)
    assert ctl(balance, port, "show", "-b", "::1") == table(row(0, "RR", 0, "ENA", "::1", b.port))
    assert ctl(balance, port, "disable 0", "-b", "::1") == "channel 0 disabled\n"
    assert read_tag(port, "127.0.0.1") == "A"


# -- bad input --------------------------------------------------------------------------


def test_bad_input_messages(two, balance):
    port, proc, a, b = two
    long_line = "show " + "x" * 600
    pairs = [
        ("frobnicate", "syntax error\n"),
        ("disable", "syntax error\n"),
        ("disable x", "syntax error\n"),
        ("disable 5", "no such channel 5\n"),
        ("disable -1", "no such channel -1\n"),
        ("enable 0 1", "syntax error\n"),
        ("maxc 0 -3", "value out of range\n"),
        ("maxc 0 abc", "syntax error\n"),
        ("maxc 0 99999999999", "value out of range\n"),
        ("group 32", "value out of range\n"),
        ("group x", "syntax error\n"),
        ("mrtg-bytes 3 0", "unknown group\n"),
        ("mrtg-conns 0 9", "unknown channel\n"),
        ("mrtg-conns 0", "syntax error\n"),
        ("create no-such-host.invalid 80", "invalid address\n"),
        ("create 127.0.0.1 70000", "value out of range\n"),
        ("create 127.0.0.1 0", "value out of range\n"),
        ("create 127.0.0.1 no-such-service", "syntax error\n"),
        ("assign 0 127.0.0.1 80", "channel must be disabled to assign new address\n"),
        ("assign 7 127.0.0.1 80", "unknown channel\n"),
        ("maxc 7 1", "unknown channel\n"),
        ("reset 7", "no such channel 7\n"),
        ("group -1", "value out of range\n"),
        ("monitor sideways", "no monitor process running\n"),
        ("show me", "syntax error\n"),
        (long_line, "line too long (more than 512 characters), ignored\n"),
        ("", ""),
        ("show", table(row(0, "RR", 0, "ENA", "127.0.0.1", a.port),
                       row(0, "RR", 1, "ENA", "127.0.0.1", b.port))),
    ]
    r = session(balance, port, [line for line, _ in pairs])
    assert r.returncode == 0
    assert r.stderr == ""
    assert r.stdout == transcript(proc.pid, pairs)
    assert pid_alive(proc.pid)
    assert sorted(tags(port, 2)) == ["A", "B"]


def test_garbage_input_cannot_hurt_the_master(two, balance):
    port, proc, a, b = two
    before = ctl(balance, port, "show")
    garbage = ["show\x00", "\x1b[2J\x07", "\uff53\uff48\uff4f\uff57", "disable \u0663",
               "create 127.0.0.1 \u0668\u0660", "maxc 0 1e3", "group 0x1", "\tshow\t extra",
               "create 1.2.3.4.5 80", "reset 99999999999999999999999", "assign 0 [::1 80"]
    r = session(balance, port, garbage)
    assert r.returncode == 0 and r.stderr == ""
    answers = r.stdout.split("balance[0] ")[1:-1]
    assert answers == ["syntax error\n"] * 8 + \
                      ["invalid address\n", "syntax error\n", "invalid address\n"]
    assert ctl(balance, port, "show") == before
    assert pid_alive(proc.pid)
    assert sorted(tags(port, 2)) == ["A", "B"]


def test_no_channel_slots_available(balance, backends):
    a = backends("A")
    port = free_port()
    launch(balance, str(port), a.spec, port=port, rows=1)
    r = session(balance, port, [f"create 127.0.0.1 {1000 + i}" for i in range(64)])
    assert r.stdout.count("channel created\n") == 63
    assert r.stdout.endswith("balance[0] no channel slots available\nbalance[0] \n")
    assert len(channels(balance, port)) == 64


def test_c_exits_zero_even_after_an_error_message(two, balance):
    port, proc, a, b = two
    assert ctl(balance, port, "disable 9") == "no such channel 9\n"
    assert ctl(balance, port, "nonsense") == "syntax error\n"
    assert ctl(balance, port, "x" * 1000) == "line too long (more than 512 characters), ignored\n"
    assert ctl(balance, port, "quit") == ""


def test_abbreviations_take_the_first_command_in_help_order(two, balance):
    port, proc, a, b = two
    full_help = ctl(balance, port, "help")
    shown = table(row(0, "RR", 0, "ENA", "127.0.0.1", a.port), row(0, "RR", 1, "ENA", "127.0.0.1", b.port))
    pairs = [
        ("?", full_help),
        ("h", full_help),                          # help comes before hash
        ("ha", "group 0 set to hash\n"),
        ("r", "syntax error\n"),                   # reset needs a channel
        ("rr", "group 0 set to round robin\n"),
        ("s", shown),
        ("SHOW", shown),
        ("v", "  This is balance 1.0.0 (gbalance)\n  MAXGROUPS=32\n  MAXCHANNELS=64\n"),
        ("mr 0 1", "0\n0\nUNKNOWN\ngroup 0 channel 1\n"),
        ("mrtg-c 0 1", "0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 1\n"),
        ("d 1", "channel 1 disabled\n"),
        ("e 1", "channel 1 enabled\n"),
        ("mo", "no monitor process running\n"),
        ("g 3", "unknown group\n"),
        ("q", ""),
    ]
    r = session(balance, port, [line for line, _ in pairs] + ["show"])
    assert r.returncode == 0
    expected = transcript(proc.pid, pairs, group_after=[0] * 14 + [3, 3])
    assert r.stdout == expected[:-len("balance[3] \n")]      # quit: no final prompt
    assert ctl(balance, port, "me").startswith("# HELP balance_up ")


def test_help_lists_every_command(two, balance):
    port, proc, a, b = two
    lines = ctl(balance, port, "help").splitlines()
    assert lines[0] == "available commands:"
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["help", "assign", "create", "disable", "enable", "group", "hash", "health", "kill", "maxc",
                     "metrics", "monitor", "mrtg-bytes", "mrtg-conns", "quit", "reset", "rr", "show",
                     "version"]
    assert all(line.startswith("  ") for line in lines[1:])


# -- metrics and monitor ------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?\d+(?:\.\d+)?)$')


def parse_metrics(text: str) -> dict[tuple, int]:
    """Check the exposition format line by line and return {(name, labels): value}."""
    samples: dict[tuple, int] = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in declared
            declared[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and name in declared
            declared[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, line
            name = m.group(1)
            assert declared.get(name), f"{name} has no TYPE"
            if declared[name] == "counter":
                assert name.endswith("_total")
            labels = tuple(sorted(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2))))
            assert (name, labels) not in samples
            samples[(name, labels)] = float(m.group(3)) if "." in m.group(3) else int(m.group(3))
    return samples


def test_metrics_in_prometheus_text_format(balance, backends):
    a, b = backends("AAAA"), backends("BB")
    port = free_port()
    before = int(time.time())
    proc = launch(balance, str(port), a.spec, f"{b.spec}:5", port=port, rows=2)
    assert tags(port, 3) == ["AAAA", "BB", "AAAA"]
    wait_idle(balance, port, 3)
    ctl(balance, port, "disable 1")
    wait_idle(balance, port, 3, rcvd=13)
    text = ctl(balance, port, "metrics")
    m = parse_metrics(text)
    inst = (("bind", "any"), ("port", str(port)))
    ch0 = tuple(sorted((("address", "127.0.0.1"), ("channel", "0"), ("group", "0"),
                        ("channel_port", str(a.port))) + inst))
    ch1 = tuple(sorted((("address", "127.0.0.1"), ("channel", "1"), ("group", "0"),
                        ("channel_port", str(b.port))) + inst))
    for name, labels in m:                       # every series names its instance, none a pid
        assert dict(labels)["port"] == str(port) and dict(labels)["bind"] == "any", name
        assert "pid" not in dict(labels) and str(proc.pid) not in text
    assert m[("balance_up", inst)] == 1
    assert before - 1 <= m[("balance_start_time_seconds", inst)] <= int(time.time())
    assert m[("balance_monitoring", tuple(sorted(inst + (("state", "none"),))))] == 1
    assert m[("balance_group_type", tuple(sorted(inst + (("group", "0"), ("type", "rr")))))] == 1
    assert m[("balance_group_type", tuple(sorted(inst + (("group", "0"), ("type", "hash")))))] == 0
    assert m[("balance_channel_connections_total", ch0)] == 2
    assert m[("balance_channel_connections_total", ch1)] == 1
    assert m[("balance_channel_connections", ch0)] == 0
    assert m[("balance_channel_received_bytes_total", ch0)] == 10
    assert m[("balance_channel_received_bytes_total", ch1)] == 3
    assert m[("balance_channel_sent_bytes_total", ch0)] == 0
    assert m[("balance_channel_maxc", ch1)] == 5
    assert m[("balance_channel_suspect", ch1)] == 0
    assert m[("balance_channel_state", tuple(sorted(ch0 + (("state", "enabled"),))))] == 1
    assert m[("balance_channel_state", tuple(sorted(ch1 + (("state", "hard_disabled"),))))] == 1
    assert m[("balance_channel_state", tuple(sorted(ch1 + (("state", "enabled"),))))] == 0


def test_metrics_labels_survive_a_restart_and_tell_instances_apart(balance, backends):
    a = backends("A")
    port = free_port()
    first = launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    other = launch(balance, "-b", "127.0.0.2", str(port), a.spec, port=port, rows=1)
    one = parse_metrics(ctl(balance, port, "metrics", "-b", "127.0.0.1"))
    two = parse_metrics(ctl(balance, port, "metrics", "-b", "127.0.0.2"))
    assert not set(one) & set(two)               # one textfile directory may hold both
    first.stop()
    time.sleep(1.1)                              # a start time in another second
    launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    again = parse_metrics(ctl(balance, port, "metrics", "-b", "127.0.0.1"))
    assert set(again) == set(one)                # the same series, no label changed
    start = [k for k in one if k[0] == "balance_start_time_seconds"][0]
    assert again[start] > one[start]
    assert other.p.poll() is None


def test_metrics_file_is_replaced_atomically(balance, backends, tmp_path):
    a = backends("A")
    port = free_port()
    launch(balance, str(port), a.spec, port=port, rows=1)
    out = tmp_path / "textfile"
    out.mkdir()
    target = out / f"balance_{port}_any.prom"
    target.write_text("# HELP balance_up an earlier run\n")    # a metrics file balance wrote
    inode = target.stat().st_ino
    r = balance.run("-c", f"metrics {target}", str(port))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    text = target.read_text()
    assert text == ctl(balance, port, "metrics")
    assert target.stat().st_ino != inode             # a new file renamed into place
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == [target.name]   # no temporary left
    r = balance.run("-c", f"metrics {tmp_path}/missing/x.prom", str(port))
    assert r.returncode == 73 and r.stdout == ""
    assert r.stderr == (f"balance: cannot write metrics to {tmp_path}/missing/x.prom: "
                        "No such file or directory\n")
    other = out / "other.prom"                       # not balance's: left alone
    other.write_text("old\n")
    r = balance.run("-c", f"metrics {other}", str(port))
    assert r.returncode == 73 and other.read_text() == "old\n"
    assert r.stderr == (f"balance: cannot write metrics to {other}: "
                        "refusing to replace other.prom: not a metrics file balance wrote\n")


def test_monitor_enable_disable_show(balance, backends):
    a = backends("A")
    dead = free_port()
    port = free_port()
    proc = launch(balance, "-m", "connect:interval=0.2", str(port), a.spec, f"127.0.0.1:{dead}",
                  port=port, rows=2)
    wait_for(lambda: channels(balance, port)[1].status == SOFT_DISABLED, "the check to soft-disable")
    assert rows_of(ctl(balance, port, "show"))[1][3] == "dis"
    assert ctl(balance, port, "monitor disable") == "monitor is now disabled\n"
    assert ctl(balance, port, "monitor disable") == "monitor is already disabled\n"
    assert ctl(balance, port, "monitor show") == \
        f"monitor process running as pid {proc.pid} and is disabled\n"   # balance.fm's line only
    out = ctl(balance, port, "health").splitlines()
    assert out[0] == f"monitor process running as pid {proc.pid} and is disabled"
    assert out[1].split() == ["GRP", "#", "S", "ip-address", "port", "suspect", "fails", "passes",
                              "stagger", "staggered", "since"]
    assert out[3].split()[:5] == ["0", "1", "dis", "127.0.0.1", str(dead)]
    assert ctl(balance, port, "enable 1") == "channel 1 enabled\n"
    # That no round runs while the monitor is off is shown on a fake clock
    # (test_monitor.py::test_monitor_switched_off_clears_suspects_once_and_runs_no_round).
    assert rows_of(ctl(balance, port, "show"))[1][3] == "ENA"
    assert ctl(balance, port, "monitor enable") == "monitor is now enabled\n"
    assert ctl(balance, port, "monitor enable") == "monitor is already enabled\n"
    wait_for(lambda: channels(balance, port)[1].status == SOFT_DISABLED, "checks to resume")
    assert ctl(balance, port, "monitor show") == \
        f"monitor process running as pid {proc.pid} and is enabled\n"
    for bad in ("monitor", "monitor sideways", "monitor show now"):
        assert ctl(balance, port, bad) == "syntax error\n"
    m = parse_metrics(ctl(balance, port, "metrics"))
    assert m[("balance_monitoring", (("bind", "any"), ("port", str(port)), ("state", "enabled")))] == 1


def test_monitor_not_configured(two, balance):
    port, proc, a, b = two
    for cmd in ("monitor", "monitor enable", "monitor show", "monitor sideways", "health"):
        assert ctl(balance, port, cmd) == "no monitor process running\n"


def test_help_has_balance_fm_monitor_line(two, balance):
    port, proc, a, b = two
    assert "  monitor [enable|disable|show]  control the monitor process\n" in ctl(balance, port, "help")


# -- terminals, pipes, permissions ------------------------------------------------------------


def read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    """Read from ``fd`` until ``marker`` shows up (bounded)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, data
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:   # a pty reports EIO once the other side closed
                chunk = b""
            assert chunk, data
            data += chunk
    return data


def test_pipe_answers_each_command_at_once(two, balance):
    """Without a tty every answer and prompt is flushed before the next line is read."""
    port, proc, a, b = two
    p = subprocess.Popen(BALANCE + ["-i", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT, env=balance.env)
    try:
        fd = p.stdout.fileno()
        read_until(fd, b"balance[0] ")
        p.stdin.write(b"disable 0\n")
        p.stdin.flush()
        assert read_until(fd, b"balance[0] ") == b"channel 0 disabled\nbalance[0] "
        assert tags(port, 2) == ["B", "B"]                # applied while the session is open
        p.stdin.write(b"group 1\n")
        p.stdin.flush()
        assert read_until(fd, b"balance[1] ") == b"unknown group\nbalance[1] "
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        assert os.read(fd, 100) == b"\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_tty_session_with_readline_history(two, balance, tmp_path):
    port, proc, a, b = two
    home = tmp_path / "home"
    home.mkdir()
    master, slave = pty.openpty()
    env = dict(balance.env, HOME=str(home), TERM="dumb")
    p = subprocess.Popen(BALANCE + ["-i", str(port)], stdin=slave, stdout=slave, stderr=slave,
                         cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    try:
        read_until(master, b"balance[0] ")
        os.write(master, b"disable 1\n")
        # Wait for the next prompt: readline is in raw mode again and sees ^D itself.
        read_until(master, b"channel 1 disabled\r\nbalance[0] ")
        os.write(master, b"\x04")                         # ^D: end of input
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert tags(port, 2) == ["A", "A"]
    assert "disable 1" in (home / ".balance_history").read_text()


def test_terminal_session_adds_hints_after_balances_answers(two, balance, tmp_path):
    """On a terminal a person gets a hint on the line after balance's answer
    (user input echoed only as printable ASCII); -c prints balance's line alone."""
    port, proc, a, b = two
    master, slave = pty.openpty()
    env = dict(balance.env, HOME=str(tmp_path), TERM="dumb")
    p = subprocess.Popen(BALANCE + ["-i", str(port)], stdin=slave, stdout=slave, stderr=slave,
                         cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    try:
        read_until(master, b"balance[0] ")
        answers = []
        for line, prompt in (("frobnicate", 0), ("\uff53\uff48\uff4f\uff57", 0), ("mo show", 0),
                             ("group 4", 4)):
            os.write(master, line.encode() + b"\n")
            out = read_until(master, f"balance[{prompt}] ".encode()).decode()
            answers.append(out.split("\r\n", 1)[1].replace("\r\n", "\n"))   # drop the echo
        os.write(master, b"\x04")
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert answers == [
        "syntax error\n(unknown command frobnicate: type help for a list)\nbalance[0] ",
        "syntax error\n(unknown command ????: type help for a list)\nbalance[0] ",
        "no monitor process running\n(start the master with -m to use monitoring)\nbalance[0] ",
        "unknown group\n(group 4 has no channels; create adds one to it)\nbalance[4] ",
    ]


def test_kill_of_a_draining_master_says_more_only_on_a_terminal(balance, backends, tmp_path):
    """``kill`` returns while the master still drains an open connection:
    ``-c`` prints balance's one line, a terminal session adds why it returned."""
    a = backends("A")
    for terminal in (False, True):
        port = free_port()
        proc = launch(balance, "-g", "30", str(port), a.spec, port=port, rows=1)
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert held.recv(2) == b"A\n"
        if terminal:
            master, slave = pty.openpty()
            p = subprocess.Popen(BALANCE + ["-i", str(port)], stdin=slave, stdout=slave, stderr=slave,
                                 cwd=ROOT, env=dict(balance.env, HOME=str(tmp_path), TERM="dumb"),
                                 close_fds=True)
            os.close(slave)
            try:
                read_until(master, b"balance[0] ")
                os.write(master, b"kill\n")
                out = read_until(master, b"grace period is over)\r\n").decode()
                assert p.wait(timeout=10) == 0
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                os.close(master)
            assert out.split("\r\n", 1)[1] == (
                f"shutdown complete, exiting.\r\n(master process {proc.pid} no longer accepts; it exits"
                " when its open connections end or its -g grace period is over)\r\n")
        else:
            assert ctl(balance, port, "kill") == "shutdown complete, exiting.\n"
        assert pid_alive(proc.pid)                        # still draining the held connection
        held.close()
        wait_for(lambda: not pid_alive(proc.pid), "the drained master to exit")


def test_c_prints_exactly_balances_text(balance, backends):
    """Scripts compare whole outputs: for each command balance and balance.fm
    have, ``-c`` prints their text byte for byte and nothing else, on
    stdout, with nothing on stderr and exit status 0."""
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = launch(balance, str(port), a.spec, b.spec, port=port, rows=2)
    expected = [
        ("show", table(row(0, "RR", 0, "ENA", "127.0.0.1", a.port),
                       row(0, "RR", 1, "ENA", "127.0.0.1", b.port))),
        ("frobnicate", "syntax error\n"),
        ("show extra", "syntax error\n"),
        ("disable", "syntax error\n"),
        ("disable 9", "no such channel 9\n"),
        ("enable 0", "channel 0 already enabled\n"),
        ("disable 1", "channel 1 disabled\n"),
        ("disable 1", "channel 1 already disabled\n"),
        ("enable 1", "channel 1 enabled\n"),
        ("reset 9", "no such channel 9\n"),
        ("reset 0", "channel 0 counters reset\n"),
        ("assign 0 127.0.0.1 80", "channel must be disabled to assign new address\n"),
        ("assign 9 127.0.0.1 80", "unknown channel\n"),
        ("maxc 9 1", "unknown channel\n"),
        ("maxc 0 3", "maxc of channel 0 changed to 3\n"),
        ("maxc 0 0", "maxc of channel 0 changed to 0\n"),
        ("group 0", ""),
        ("group 1", "unknown group\n"),
        ("group 32", "value out of range\n"),
        ("group -1", "value out of range\n"),
        ("hash", "group 0 set to hash\n"),
        ("rr", "group 0 set to round robin\n"),
        ("create no-such-host.invalid 80", "invalid address\n"),
        ("mrtg-bytes 0 1", "0\n0\nUNKNOWN\ngroup 0 channel 1\n"),
        ("mrtg-conns 0 1", "0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 1\n"),
        ("mrtg-bytes 5 0", "unknown group\n"),
        ("mrtg-conns 0 5", "unknown channel\n"),
        ("monitor", "no monitor process running\n"),
        ("monitor show", "no monitor process running\n"),
        ("monitor enable", "no monitor process running\n"),
        ("monitor sideways", "no monitor process running\n"),
        ("version", "  This is balance 1.0.0 (gbalance)\n  MAXGROUPS=32\n  MAXCHANNELS=64\n"),
        ("quit", ""),
    ]
    for command, text in expected:
        r = balance.run("-c", command, str(port), timeout=20)
        assert (command, r.returncode, r.stdout.encode(), r.stderr) == \
            (command, 0, text.encode(), ""), command
    # With -m: balance.fm's texts, monitor show its one line.
    m = free_port()
    mon = launch(balance, "-m", "connect:interval=30", str(m), a.spec, port=m, rows=1)
    for command, text in (
            ("monitor show", f"monitor process running as pid {mon.pid} and is enabled\n"),
            ("monitor", "syntax error\n"),
            ("monitor enable now", "syntax error\n"),
            ("monitor enable", "monitor is already enabled\n"),
            ("monitor disable", "monitor is now disabled\n"),
            ("monitor disable", "monitor is already disabled\n"),
            ("monitor show", f"monitor process running as pid {mon.pid} and is disabled\n"),
            ("monitor enable", "monitor is now enabled\n")):
        r = balance.run("-c", command, str(m), timeout=20)
        assert (command, r.returncode, r.stdout.encode(), r.stderr) == \
            (command, 0, text.encode(), ""), command
    r = balance.run("-c", "kill", str(port), timeout=20)
    assert (r.returncode, r.stdout.encode(), r.stderr) == (0, b"shutdown complete, exiting.\n", "")
    assert not pid_alive(proc.pid)


@pytest.fixture
def shared_state_dir():
    """A state directory any user can read (tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="gbal-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_other_user_may_show_but_not_change(balance, backends, shared_state_dir):
    otheruser.require_root()
    balance.state_dir = shared_state_dir
    balance.env["BALANCE_STATE_DIR"] = str(shared_state_dir)
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = launch(balance, str(port), a.spec, b.spec, port=port, rows=2)
    path = shared_state_dir / f"balance.{port}.any"
    assert path.stat().st_mode & 0o777 == 0o644

    def as_nobody(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return otheruser.run(otheruser.balance_argv(*args), balance.env, stdin=stdin)

    root_view = ctl(balance, port, "show")
    r = as_nobody("-c", "show", str(port))
    assert (r.returncode, r.stdout, r.stderr) == (0, root_view, "")
    denied = "permission denied: only the master's user may change this balance\n"
    for cmd in ("disable 0", "enable 0", "maxc 0 3", "reset 0", "hash", "rr", "kill",
                "create 127.0.0.1 80", "assign 0 127.0.0.1 80"):
        r = as_nobody("-c", cmd, str(port))
        assert (r.returncode, r.stdout, r.stderr) == (0, denied, ""), cmd
    r = as_nobody("-i", str(port), stdin="disable 1\nmrtg-conns 0 0\n")
    assert r.returncode == 0 and r.stderr == ""
    assert f"balance[0] {denied}balance[0] 0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n" in r.stdout
    assert ctl(balance, port, "show") == root_view          # nothing changed
    assert pid_alive(proc.pid)
    assert sorted(tags(port, 2)) == ["A", "B"]
    path.chmod(0o600)                                        # stricter than balance's default
    r = as_nobody("-c", "show", str(port))
    assert (r.returncode, r.stdout, r.stderr) == (77, "", f"balance: permission denied: cannot read {path}\n")
