"""Health monitoring (``-m``) end to end: a real master, real backends, real commands."""

from __future__ import annotations

import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Backend, free_port, pid_alive, read_tag
from monhelp import ENABLED, HARD_DISABLED, MON_DISABLED, MON_ENABLED, SOFT_DISABLED, Op, Table, wait_for

from gbalance.monitor.monitor import check_argv, command_argv, expand

INTERVAL = 0.3
SLACK = 0.45   # scheduling and polling slack on a busy 2-core machine


@pytest.fixture
def table(balance):
    """Open a master's table by port once it runs; closed after the test."""
    opened: list[Table] = []

    def open_(port: int) -> Table:
        t = Table(balance.state_dir, port)
        opened.append(t)
        return t

    yield open_
    for t in opened:
        t.close()


def reopen(backend: Backend, tag: str) -> Backend:
    """A new backend listening on the port a closed one used."""
    return Backend(tag, port=backend.port)


# -- pure helpers ----------------------------------------------------------------

def test_expand_placeholders():
    assert expand("chk -h %H -p %P 100%% %S", "10.0.0.1", 8080) == "chk -h 10.0.0.1 -p 8080 100% %S"
    assert expand("%H:%P", "::1", 22) == "::1:22"


def test_command_runs_without_shell_unless_needed():
    assert command_argv("/bin/true -x 1") == ["/bin/true", "-x", "1"]
    assert command_argv("true --port=80") == ["true", "--port=80"]
    for line in ("check > /dev/null", "a | b", "a; b", "a && b", "echo $HOME", "echo 'x y'",
                 "ls *.py", "X=1 prog", "exit 2"):
        assert command_argv(line) == ["/bin/sh", "-c", line], line


def test_placeholders_are_quoted_when_a_shell_runs_the_check(tmp_path):
    """Even an address that slipped past validation stays one word for /bin/sh."""
    hostile = "1.2.3.4; touch " + str(tmp_path / "pwned")
    line, argv = check_argv("test -n %H && echo %H:%P > " + str(tmp_path / "out"), hostile, 80)
    assert argv[:2] == ["/bin/sh", "-c"] and "'1.2.3.4; touch" in argv[2]
    assert subprocess.run(argv).returncode == 0
    assert (tmp_path / "out").read_text() == hostile + ":80\n"
    assert not (tmp_path / "pwned").exists()
    assert check_argv("/bin/true %H %P", "::1", 80) == ("/bin/true ::1 80", ["/bin/true", "::1", "80"])


# -- connect checks ------------------------------------------------------------------

def test_dead_port_disabled_then_reenabled_within_one_interval(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = balance.start("-m", f"connect:interval={INTERVAL}", str(port), a.spec, b.spec, port=port)
    t = table(port)
    time.sleep(INTERVAL)
    assert t.status(0, 0) == ENABLED and t.status(0, 1) == ENABLED
    a.close()
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, INTERVAL + SLACK)
    assert {read_tag(port) for _ in range(4)} == {"B"}
    a2 = reopen(a, "A2")
    try:
        wait_for(lambda: t.status(0, 0) == ENABLED, INTERVAL + SLACK)
        assert {read_tag(port) for _ in range(4)} == {"A2", "B"}
    finally:
        a2.close()
    _, err = proc.stop()
    assert f"group 0 channel 0 127.0.0.1:{a.port} soft-disabled by monitoring: connect failed" in err
    assert f"group 0 channel 0 127.0.0.1:{a.port} enabled by monitoring: checks pass" in err


def rounds_passed(t, witness: Backend, g: int, c: int) -> Backend:
    """Prove that a whole monitoring round started after this call and ran:
    close ``witness`` (channel g/c) and wait for its soft-disable, then
    reopen it and wait for its enable again (that needs a round that began
    after the close).  Returns the reopened witness."""
    witness.close()
    wait_for(lambda: t.status(g, c) == SOFT_DISABLED, 4 * (INTERVAL + SLACK))
    again = reopen(witness, "W2")
    wait_for(lambda: t.status(g, c) == ENABLED, 4 * (INTERVAL + SLACK))
    return again


def test_hard_disabled_is_never_touched(balance, backends, table):
    # "Nothing happened" is shown by a witness channel the same rounds
    # visibly changed, not by sleeping and hoping a round ran.
    a, b, w = backends("A"), backends("B"), backends("W")
    port = free_port()
    balance.start("-m", f"connect:interval={INTERVAL}", str(port), a.spec, b.spec, w.spec, port=port)
    t = table(port)
    t.set_status(0, 0, HARD_DISABLED)        # what "disable 0" in the shell does
    w = rounds_passed(t, w, 0, 2)
    assert t.status(0, 0) == HARD_DISABLED    # passing checks do not enable it
    b.close()
    wait_for(lambda: t.status(0, 1) == SOFT_DISABLED, INTERVAL + SLACK)
    t.set_status(0, 1, HARD_DISABLED)
    b2 = reopen(b, "B2")
    try:
        w = rounds_passed(t, w, 0, 2)
        assert t.status(0, 1) == HARD_DISABLED
    finally:
        b2.close()
        w.close()


def test_noenable_keeps_failed_channel_disabled(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    balance.start("-m", f"connect:interval={INTERVAL}:noenable", str(port), a.spec, b.spec, port=port)
    t = table(port)
    a.close()
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, INTERVAL + SLACK)
    a2 = reopen(a, "A2")
    try:
        wait_for(lambda: t.snapshot(0, 0)["passes"] >= 3, 5 * INTERVAL + SLACK)   # checks ran and passed
        assert t.status(0, 0) == SOFT_DISABLED
    finally:
        a2.close()


def test_nodisable_keeps_failing_channel_enabled(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = balance.start("-m", f"connect:interval={INTERVAL}:nodisable", str(port), a.spec, b.spec, port=port)
    t = table(port)
    a.close()
    wait_for(lambda: t.snapshot(0, 0)["fails"] >= 3, 5 * INTERVAL + SLACK)
    assert t.status(0, 0) == ENABLED
    _, err = proc.stop()
    assert "nodisable: stays enabled" in err
    assert err.count("check failed") == 1     # said once, not every interval


def test_rise_and_fall_count_consecutive_results(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    interval = 0.2
    balance.start("-m", f"connect:interval={interval}:rise=3:fall=2", str(port), a.spec, b.spec, port=port)
    t = table(port)
    a.close()
    seen = []
    wait_for(lambda: seen.append(t.snapshot(0, 0)) or seen[-1]["status"] == SOFT_DISABLED, 6 * interval + SLACK)
    assert any(s["fails"] == 1 and s["status"] == ENABLED for s in seen)   # one failure is not enough
    assert all(s["status"] == ENABLED for s in seen if s["fails"] < 2)
    assert seen[-1]["fails"] == 2
    a2 = reopen(a, "A2")
    try:
        seen = []
        wait_for(lambda: seen.append(t.snapshot(0, 0)) or seen[-1]["status"] == ENABLED, 8 * interval + SLACK)
        assert any(s["passes"] == 2 and s["status"] == SOFT_DISABLED for s in seen)
        assert all(s["status"] == SOFT_DISABLED for s in seen if s["passes"] < 3)
        assert seen[-1]["passes"] == 3
    finally:
        a2.close()


def test_monitor_disable_in_shell_freezes_states(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    balance.start("-m", f"connect:interval={INTERVAL}", str(port), a.spec, b.spec, port=port)
    t = table(port)
    t.set_monitor(MON_DISABLED)              # what "monitor disable" in the shell does
    a.close()
    time.sleep(3 * INTERVAL)
    assert t.status(0, 0) == ENABLED
    # Passive detection is part of monitoring: off too (clients still fail over).
    assert {read_tag(port) for _ in range(3)} == {"B"}
    assert t.status(0, 0) == ENABLED
    t.set_monitor(MON_ENABLED)
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, INTERVAL + SLACK)


def test_channel_created_later_is_checked(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    balance.start("-m", f"connect:interval={INTERVAL}", str(port), a.spec, port=port)
    t = table(port)
    dead = free_port()
    c = t.request(Op.CREATE, 0, a=dead, address="127.0.0.1")      # "create", then "enable"
    t.set_status(0, c, ENABLED)
    wait_for(lambda: t.status(0, c) == SOFT_DISABLED, INTERVAL + SLACK)
    t.set_status(0, c, HARD_DISABLED)                             # "disable", "assign" a live
    t.request(Op.ASSIGN, 0, c, a=b.port, address="127.0.0.1")     # backend, "enable"
    assert t.snapshot(0, c)["fails"] == 0
    t.set_status(0, c, ENABLED)
    wait_for(lambda: t.snapshot(0, c)["passes"] >= 2, 2 * INTERVAL + SLACK)
    assert t.status(0, c) == ENABLED


# -- passive detection -----------------------------------------------------------------

def test_passive_detection_disables_at_once_and_monitor_reenables(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    interval = 2.0
    proc = balance.start("-m", f"connect:interval={interval}", str(port), a.spec, b.spec, port=port)
    t = table(port)
    time.sleep(0.2)                       # the first round (at start) has passed
    a.close()
    start = time.monotonic()
    assert [read_tag(port) for _ in range(2)] == ["B", "B"]   # one of them tried A first
    assert t.status(0, 0) == SOFT_DISABLED
    assert time.monotonic() - start < 0.5                     # long before the next round
    a2 = reopen(a, "A2")
    try:
        wait_for(lambda: t.status(0, 0) == ENABLED, interval + SLACK)
    finally:
        a2.close()
    _, err = proc.stop()
    assert f"group 0 channel 0 127.0.0.1:{a.port} soft-disabled: connect refused" in err


def test_autodisable_without_monitoring_needs_manual_enable(balance, backends, table):
    a, b = backends("A"), backends("B")
    port = free_port()
    proc = balance.start("-a", str(port), a.spec, b.spec, port=port)
    t = table(port)
    a.close()
    assert [read_tag(port) for _ in range(2)] == ["B", "B"]
    assert t.status(0, 0) == SOFT_DISABLED
    a2 = reopen(a, "A2")
    try:
        time.sleep(0.5)
        assert t.status(0, 0) == SOFT_DISABLED
        assert {read_tag(port) for _ in range(3)} == {"B"}
    finally:
        a2.close()
    _, err = proc.stop()
    assert "connection failed group 0 channel 0" in err
    assert f"127.0.0.1:{a.port} needs to be enabled manually" in err


# -- command checks ---------------------------------------------------------------------

def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_command_pass_codes_and_placeholders(balance, backends, table, tmp_path):
    a, b = backends("A"), backends("B")
    calls, code = tmp_path / "calls", tmp_path / "code"
    code.write_text("2\n")
    check = script(tmp_path, "check.sh", f'echo "$1 $2 $3" >> {calls}\nexit $(cat {code})\n')
    port = free_port()
    balance.start("-m", rf"command={check} %H %P %H\:%P:pass=0,2:interval={INTERVAL}",
                  str(port), a.spec, b.spec, port=port)
    t = table(port)
    wait_for(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 4, 3 * INTERVAL + SLACK)
    lines = set(calls.read_text().splitlines())
    assert lines == {f"127.0.0.1 {a.port} 127.0.0.1:{a.port}", f"127.0.0.1 {b.port} 127.0.0.1:{b.port}"}
    assert t.status(0, 0) == ENABLED          # exit 2 passes
    code.write_text("1\n")
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED and t.status(0, 1) == SOFT_DISABLED,
             INTERVAL + SLACK)
    code.write_text("0\n")
    wait_for(lambda: t.status(0, 0) == ENABLED and t.status(0, 1) == ENABLED, INTERVAL + SLACK)


def test_chain_short_circuits_after_failed_connect(balance, backends, table, tmp_path):
    a = backends("A")
    dead = free_port()
    calls = tmp_path / "calls"
    check = script(tmp_path, "check.sh", f'echo "$1" >> {calls}\n')
    port = free_port()
    balance.start("-m", f"connect:command={check} %P:interval={INTERVAL}",
                  str(port), a.spec, f"127.0.0.1:{dead}", port=port)
    t = table(port)
    wait_for(lambda: t.status(0, 1) == SOFT_DISABLED, INTERVAL + SLACK)
    time.sleep(2 * INTERVAL)
    ports = set(calls.read_text().split())
    assert ports == {str(a.port)}             # never run for the channel whose connect failed


def test_command_output_goes_to_log_not_stdout(balance, backends, tmp_path):
    a = backends("A")
    port = free_port()
    proc = balance.start("-m", f"command=echo hello-from-check %P:interval={INTERVAL}",
                         str(port), a.spec, port=port)
    time.sleep(2 * INTERVAL)
    out, err = proc.stop()
    assert "hello-from-check" not in out
    assert f"group 0 channel 0 127.0.0.1:{a.port} check output: hello-from-check {a.port}" in err


def test_missing_program_fails_the_check(balance, backends, table, tmp_path):
    a = backends("A")
    port = free_port()
    proc = balance.start("-m", f"command={tmp_path}/no-such-check:interval={INTERVAL}",
                         str(port), a.spec, port=port)
    t = table(port)
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, INTERVAL + SLACK)
    _, err = proc.stop()
    assert "No such file or directory" in err and "Traceback" not in err


def test_shell_command_and_builtin(balance, backends, table, tmp_path):
    a, b = backends("A"), backends("B")
    port = free_port()
    marker = tmp_path / "m"
    balance.start("-m", f"command=test %P -eq {a.port} && echo ok > {marker}:interval={INTERVAL}",
                  str(port), a.spec, b.spec, port=port)
    t = table(port)
    # The two channels are checked in parallel: wait for both results.
    # The shell creates the file before echo writes to it: wait for the text.
    wait_for(lambda: t.status(0, 1) == SOFT_DISABLED and marker.exists()
             and marker.read_text() == "ok\n", INTERVAL + SLACK)
    assert t.status(0, 0) == ENABLED


def test_hung_command_killed_at_interval_and_next_interval_skipped(balance, backends, table, tmp_path):
    a = backends("A")
    pids = tmp_path / "pids"
    port = free_port()
    proc = balance.start("-m", f"command=echo $$ >> {pids}; exec sleep 30:interval={INTERVAL}",
                         str(port), a.spec, port=port)
    t = table(port)
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, INTERVAL + SLACK)
    time.sleep(8 * INTERVAL)
    started = [int(p) for p in pids.read_text().split()]
    # Rounds every other interval: each is cut at the interval, so the next tick is skipped.
    assert 3 <= len(started) <= 6, started
    time.sleep(0.2)
    alive = [p for p in started[:-1] if pid_alive(p)]
    assert alive == []                        # every earlier command was killed
    _, err = proc.stop()
    assert "still running at the end of the interval (killed)" in err
    assert "skipping 1 interval(s)" in err
    for p in started:
        assert not pid_alive(p)               # stopping the master kills the running one too


# -- through the control shell --------------------------------------------------------

def shown_states(balance, port: int) -> dict[tuple[int, int], str]:
    """``balance -c show PORT``: (group, channel) -> ENA / dis / DIS."""
    result = balance.run("-c", "show", str(port), timeout=20)
    assert result.returncode == 0, result.stderr
    states = {}
    for line in result.stdout.splitlines()[1:]:
        words = line.split()
        if len(words) >= 4 and words[0].isdigit():
            states[(int(words[0]), int(words[2]))] = words[3]
    return states


def test_shell_sees_monitoring_and_controls_it(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    balance.start("-m", f"connect:interval={INTERVAL}", str(port), a.spec, b.spec, port=port)
    a.close()
    wait_for(lambda: shown_states(balance, port)[(0, 0)] == "dis", INTERVAL + 2)
    assert balance.run("-c", "monitor disable", str(port)).stdout == "monitor is now disabled\n"
    assert balance.run("-c", "monitor disable", str(port)).stdout == "monitor is already disabled\n"
    a2 = reopen(a, "A2")
    try:
        time.sleep(3 * INTERVAL)
        assert shown_states(balance, port)[(0, 0)] == "dis"      # checks change nothing now
        assert balance.run("-c", "monitor enable", str(port)).stdout == "monitor is now enabled\n"
        wait_for(lambda: shown_states(balance, port)[(0, 0)] == "ENA", INTERVAL + 2)
        assert balance.run("-c", "disable 0", str(port)).stdout.strip() == "channel 0 disabled"
        time.sleep(3 * INTERVAL)
        assert shown_states(balance, port) == {(0, 0): "DIS", (0, 1): "ENA"}
    finally:
        a2.close()


def test_flooding_check_output_is_bounded(balance, backends, table, tmp_path):
    """A check that writes without end is read with a bound: the master's memory
    stays flat, the check still counts (killed at the interval's end), only
    the first lines reach the log."""
    a = backends("A")
    port = free_port()
    flood = tmp_path / "flood"
    flood.write_text("#!/bin/sh\nexec yes 0123456789abcdef0123456789abcdef\n")
    flood.chmod(0o755)
    proc = balance.start("-m", f"command={flood}:interval={INTERVAL}", str(port), a.spec, port=port)
    t = table(port)
    wait_for(lambda: t.status(0, 0) == SOFT_DISABLED, 2 * INTERVAL + SLACK)
    rss_kb = int(next(line.split()[1] for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:")))
    _, err = proc.stop()
    assert rss_kb < 200_000, rss_kb
    assert "still running at the end of the interval" in err
    assert err.count("check output: 0123456789abcdef") <= 20
    assert "Traceback" not in err


# -- scheduling on a fake clock (no sleeps) ------------------------------------

class RecordingLog:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg): self.lines.append(msg)
    def warning(self, msg): self.lines.append(msg)


def scheduled_monitor(interval: float, round_takes: list[float], monitor_on=lambda n: True):
    """A Monitor whose rounds take ``round_takes`` seconds of fake time each;
    the loop ends after the last of them (the first round starts with no wait)."""
    from types import SimpleNamespace

    from fakeloop import Enough, FakeClock

    from gbalance.monitor.monitor import Monitor
    from gbalance.monitor.monspec import parse_monitor
    from gbalance.table.layout import MON_DISABLED as OFF, MON_ENABLED as ON

    clock = FakeClock(stop_after=len(round_takes) - 1)
    state = SimpleNamespace(q=None, monitor=ON)
    log = RecordingLog()
    mon = Monitor(state, parse_monitor(f"connect:interval={interval}"), 1.0, log,
                  channels=object(), clock=clock)
    rounds: list[tuple[float, float]] = []
    cleared: list[float] = []

    def run_round(deadline):
        rounds.append((clock.t, deadline))
        clock.t += round_takes[len(rounds) - 1]
        state.monitor = ON if monitor_on(len(rounds)) else OFF

    mon.run_round = run_round
    mon._clear_suspects = lambda: cleared.append(clock.t)
    with pytest.raises(Enough):
        mon._loop()
    return clock, rounds, log, cleared


def test_rounds_start_every_interval_whatever_they_take():
    clock, rounds, log, _ = scheduled_monitor(1.0, [0.25, 0.5, 0.0, 0.9])
    assert [r[0] for r in rounds] == [100.0, 101.0, 102.0, 103.0]
    assert [r[1] - r[0] for r in rounds] == [1.0] * 4     # each round's deadline is one interval
    assert clock.sleeps == [0.75, 0.5, 1.0]
    assert not any("longer than the interval" in line for line in log.lines)


def test_an_overrun_skips_the_ticks_it_covered_and_warns_once():
    # Rounds of 2.5 s with a 1 s interval: the next start is the first tick
    # after the round ended (3 s later), and the warning is not repeated.
    clock, rounds, log, _ = scheduled_monitor(1.0, [2.5, 2.5, 0.2, 0.2])
    assert [r[0] for r in rounds] == [100.0, 103.0, 106.0, 107.0]
    warnings = [line for line in log.lines if "longer than the interval" in line]
    assert len(warnings) == 1 and "skipping 2 interval(s)" in warnings[0]


def test_monitor_switched_off_clears_suspects_once_and_runs_no_round():
    clock, rounds, log, cleared = scheduled_monitor(2.0, [0.0, 0.0, 0.0, 0.0],
                                                    monitor_on=lambda n: n != 1)
    assert [r[0] for r in rounds] == [100.0]      # round 1 switched it off: no more rounds
    assert cleared == [102.0]                     # suspects cleared at the next tick, once
    assert clock.sleeps == [2.0, 2.0, 2.0]
