"""balance-instances (gbalance/service/instances.py): /etc/balance.conf for both init systems.

Every test runs the real helper as a subprocess (``python -m
gbalance.service.instances``) against a private config file and state directory;
the masters it starts are real ``balance`` daemons on loopback ports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, free_port, pid_alive, read_tag, wait_listening

from gbalance import cli
from gbalance.config import DEFAULT_GRACE
from gbalance.service import conffile, systemd

REAL_BALANCE = str(Path(sys.executable).parent / "balance")


def helper_env(tmp_path: Path, conf_text: str, **extra: str) -> dict:
    conf = tmp_path / "balance.conf"
    conf.write_text(conf_text)
    env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(tmp_path / "state"),
               BALANCE_BIN=REAL_BALANCE, BALANCE_UNIT_DIR="/lib/systemd/system", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def helper(env: dict, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gbalance.service.instances", *args], env=env, timeout=timeout,
                          capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, **kw)


def recording_balance(tmp_path: Path) -> tuple[Path, Path]:
    """A balance command that logs its argv, then runs the real one (minus -r).

    Stands in for a balance with ``-r`` where the real one has none yet:
    with no master running, ``-r`` starts normally (the -r contract).
    """
    log = tmp_path / "argv.log"
    script = tmp_path / "balance-rec"
    script.write_text(f"""#!{sys.executable}
import os, sys
with open({str(log)!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if a != "-r"]
os.execv({REAL_BALANCE!r}, [{REAL_BALANCE!r}, *args])
""")
    script.chmod(0o755)
    return script, log


def stop_all(env: dict) -> None:
    helper(env, "stop")


def test_reads_one_instance_per_line(tmp_path):
    env = helper_env(tmp_path, "\n".join([
        "# a comment",
        "",
        "   # indented comment",
        "8080 web1:80 web2:80 ! backup:80   # trailing comment",
        "-b 127.0.0.1 -m 'connect:interval=10' 8080 app1 % app2",
        "-6 smtp mail1 mail2",
        "8080 other",                    # same port and address as line 4
        "-f 9000 host",                   # -f is the init system's business
        "-c show 9001",                   # not a proxy
        "70000 host",                     # bad port
        "-x 9002 host",                   # unknown option
        "9003 'unterminated",
    ]) + "\n")
    done = helper(env, "list")
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        "4 8080.any 8080 web1:80 web2:80 '!' backup:80",
        "5 8080.127.0.0.1 -b 127.0.0.1 -m connect:interval=10 8080 app1 % app2",
        "6 25.any -6 smtp mail1 mail2",
    ]
    err = done.stderr
    for line, why in ((7, "already used on line 4"), (8, "-f is not allowed"), (9, "do not start a proxy"),
                      (10, "invalid port [70000]"), (11, "not a valid balance command line"),
                      (12, "No closing quotation")):
        assert re.search(rf"line {line}: .*{re.escape(why)}", err), (line, err)
    assert "Traceback" not in err


def test_instance_names_are_state_file_names(tmp_path):
    """The instance key is the state file's name without "balance.", from state.state_path."""
    from gbalance.table.files import state_path

    for args, port, bind in ((["8080", "a"], 8080, None), (["-b", "::1", "25", "a"], 25, "::1"),
                             (["-b", "odd/name", "99", "a"], 99, "odd/name")):
        key, grace = conffile.parse_line(args)
        assert "balance." + key == os.path.basename(state_path(port, bind)), key
        assert grace == DEFAULT_GRACE
    assert conffile.parse_line(["-b", "odd/name", "99"])[0] == "99.odd_name"


def test_generator_wants_one_template_instance_per_line(tmp_path):
    env = helper_env(tmp_path, "8080 a b\n-b ::1 8080 c\n# 9090 off\nbogus line\n")
    out = tmp_path / "gen"
    done = helper(env, "generate", str(out), str(tmp_path / "early"), str(tmp_path / "late"))
    assert done.returncode == 0, done.stderr
    wants = out / "balance.service.wants"
    links = sorted(p.name for p in wants.iterdir())
    assert links == ["balance@8080.::1.service", "balance@8080.any.service"]
    assert os.readlink(wants / links[0]) == "/lib/systemd/system/balance@.service"
    assert "line 4" in done.stderr
    assert not list(out.glob("*.d")), "no drop-in without -g"
    # Run again (daemon-reload reuses nothing, but a second run must not fail).
    assert helper(env, "generate", str(out)).returncode == 0


def test_generator_gives_a_long_grace_period_a_long_stop_timeout(tmp_path, monkeypatch):
    """A line with -g gets TimeoutStopSec = grace + margin, so systemd never kills a draining master."""
    if "-g sec" not in cli.USAGE:   # -g is the stop/restart engineer's option (the -g contract)
        monkeypatch.setattr(cli, "USAGE", cli.USAGE.replace("[-t sec]", "[-g sec] [-t sec]", 1)
                            .replace("  -t sec", "  -g sec     Drain grace period.\n  -t sec", 1))
    conf = tmp_path / "balance.conf"
    conf.write_text("-g 120 8080 a\n8081 b\n-g 2.5 -b 127.0.0.1 8082 c\n-g nan 8083 d\n")
    monkeypatch.setenv("BALANCE_CONF", str(conf))
    monkeypatch.setenv("BALANCE_UNIT_DIR", "/usr/lib/systemd/system")
    cfg = conffile.read_config()
    assert [(i.key, i.grace, i.stop_timeout) for i in cfg.instances] == [
        ("8080.any", 120.0, 135), ("8081.any", 30.0, 45), ("8082.127.0.0.1", 2.5, 18)]
    assert len(cfg.problems) == 1 and "line 4: invalid timeout [nan] for -g" in cfg.problems[0]
    out = tmp_path / "gen"
    assert systemd.do_generate(str(out), conffile.Out()) == 0
    dropin = (out / "balance@8080.any.service.d" / "50-grace.conf").read_text()
    assert "[Service]\nTimeoutStopSec=135\n" in dropin
    assert (out / "balance@8082.127.0.0.1.service.d" / "50-grace.conf").read_text().endswith("TimeoutStopSec=18\n")
    assert not (out / "balance@8081.any.service.d").exists()   # the unit's own 45 s fit 30 s
    unit = (ROOT / "etc" / "systemd" / "balance@.service").read_text()
    assert re.search(r"^TimeoutStopSec=45$", unit, re.M)


def test_start_status_stop_exactly_its_instances(tmp_path, backends, balance):
    """Two good lines, one that fails at start, one invalid: the good ones run.

    ``stop`` ends exactly the instances of the file (found by the pid in
    their state files) and leaves another balance master alone.
    """
    a, b = backends("A"), backends("B")
    p1, p2, p3 = free_port(), free_port(), free_port()
    env = helper_env(tmp_path, f"-b 127.0.0.1 {p1} {a.spec}\n{p2} {b.spec}\n"
                               f"{p3} no-such-host.invalid\n-x 1 2\n")
    balance.state_dir = tmp_path / "state"
    balance.env["BALANCE_STATE_DIR"] = str(tmp_path / "state")
    other_port = free_port()
    other = balance.start(str(other_port), a.spec, port=other_port)
    try:
        done = helper(env, "start")
        assert done.returncode == 1
        assert f"{p3}.any: " in done.stderr and "line 3: failed (exit 65)" in done.stderr
        assert "line 4: not a valid balance command line" in done.stderr
        pids = [int(m) for m in re.findall(r"started \(pid (\d+)\)", done.stdout)]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        assert read_tag(p1) == "A" and read_tag(p2) == "B"

        again = helper(env, "start")
        assert f"{p1}.127.0.0.1: already running (pid {pids[0]})" in again.stdout
        assert f"{p2}.any: already running (pid {pids[1]})" in again.stdout

        status = helper(env, "status")
        assert status.returncode == 3, status.stdout   # line 3 does not run
        assert f"{p1}.127.0.0.1: running (pid {pids[0]})" in status.stdout
        assert f"{p3}.any: not running" in status.stdout

        stop = helper(env, "stop")
        assert stop.returncode == 0
        assert stop.stdout.count("stopped (pid") == 2
        assert not any(pid_alive(p) for p in pids)
        assert other.p.poll() is None and read_tag(other_port) == "A"

        status = helper(env, "status")
        assert status.returncode == 3 and status.stdout.count("not running") == 3
        assert helper(env, "stop").stdout.strip() == "balance: no instance was running"
    finally:
        stop_all(env)


def test_start_reports_a_proxy_that_did_not_come_up(tmp_path, backends):
    """balance exiting 0 without a live master behind it is a failed start, not "started"."""
    a = backends("A")
    p1 = free_port()
    env = helper_env(tmp_path, f"{p1} {a.spec}\n", BALANCE_BIN="/bin/true")
    done = helper(env, "start")
    assert done.returncode == 1
    assert f"balance {p1}.any: " in done.stderr and "the master exited right after starting" in done.stderr
    assert "started" not in done.stdout


def test_start_reports_a_port_in_use(tmp_path, backends):
    a = backends("A")
    env = helper_env(tmp_path, f"-b 127.0.0.1 {a.port} 127.0.0.1:1\n")   # the backend holds the port
    done = helper(env, "start")
    assert done.returncode == 1
    assert re.search(rf"{a.port}\.127\.0\.0\.1: .* line 1: failed \(exit 71\): .+", done.stderr), done.stderr


def test_restart_runs_balance_r_per_line_and_stops_removed_lines(tmp_path, backends):
    """restart runs "balance -r <line>" for every line and stops instances whose line is gone."""
    a, b = backends("A"), backends("B")
    p1, p2 = free_port(), free_port()
    env = helper_env(tmp_path, f"{p1} {a.spec}\n-b 127.0.0.1 {p2} {b.spec}\n")
    try:
        first = helper(env, "start")
        assert first.returncode == 0, first.stderr
        p1_pid, p2_pid = (int(x) for x in re.findall(r"started \(pid (\d+)\)", first.stdout))
        (tmp_path / "balance.conf").write_text(f"{p1} {a.spec}\n")   # line 2 removed
        rec, log = recording_balance(tmp_path)
        done = helper(dict(env, BALANCE_BIN=str(rec)), "restart")
        assert log.read_text().splitlines() == [f"-r {p1} {a.spec}"]
        assert f"balance {p2}.127.0.0.1: stopped (pid {p2_pid})" in done.stdout
        assert not pid_alive(p2_pid)
        # The recording balance has no real -r: with line 1's master running it
        # exits 71, and restart says so (with a real -r, pid {p1_pid} drains).
        assert "line 1: failed (exit 71)" in done.stderr and done.returncode == 1
        assert pid_alive(p1_pid) and read_tag(p1) == "A"
    finally:
        stop_all(env)


def instances_pid(env: dict, key: str) -> int:
    out = helper(env, "status").stdout
    m = re.search(rf"balance {re.escape(key)}: running \(pid (\d+)\)", out)
    return int(m.group(1)) if m else 0


def test_restart_with_nothing_running_starts_every_line_with_r(tmp_path, backends):
    a, b = backends("A"), backends("B")
    p1, p2 = free_port(), free_port()
    rec, log = recording_balance(tmp_path)
    env = helper_env(tmp_path, f"{p1} {a.spec}\n-b 127.0.0.1 {p2} {b.spec}\n", BALANCE_BIN=str(rec))
    try:
        done = helper(env, "restart")
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == [f"-r {p1} {a.spec}", f"-r -b 127.0.0.1 {p2} {b.spec}"]
        assert len(re.findall(r"started \(pid \d+\)", done.stdout)) == 2
        assert read_tag(p1) == "A" and read_tag(p2) == "B"
        stop = helper(env, "stop")
        assert stop.stdout.count("stopped (pid") == 2
    finally:
        stop_all(env)


def test_exec_becomes_the_foreground_master_in_the_same_process(tmp_path, backends):
    """systemd's ExecStart: the helper's pid is the master's pid (Type=notify main process)."""
    a = backends("A")
    p1 = free_port()
    env = helper_env(tmp_path, f"-b 127.0.0.1 {p1} {a.spec}\n")
    proc = subprocess.Popen([sys.executable, "-m", "gbalance.service.instances", "exec", f"{p1}.127.0.0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_listening(p1)
        assert read_tag(p1) == "A"
        status = helper(env, "status").stdout
        assert f"running (pid {proc.pid})" in status, status
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=40)
    missing = helper(env, "exec", "1.any")
    assert missing.returncode == 78 and "no line for instance 1.any" in missing.stderr


def test_replace_runs_balance_r_and_reports_the_new_main_pid(tmp_path, backends):
    """systemd's ExecReload: "balance -r <line>" (detaching), then MAINPID= of the new master."""
    a = backends("A")
    p1 = free_port()
    rec, log = recording_balance(tmp_path)
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # stands in for systemd's notify socket
    sd.bind(str(tmp_path / "notify"))
    env = helper_env(tmp_path, f"-b 127.0.0.1 {p1} {a.spec}\n", BALANCE_BIN=str(rec),
                     NOTIFY_SOCKET=str(tmp_path / "notify"))
    try:
        done = helper(env, "replace", f"{p1}.127.0.0.1")
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == [f"-r -b 127.0.0.1 {p1} {a.spec}"]
        assert read_tag(p1) == "A"
        pid = instances_pid(env, f"{p1}.127.0.0.1")
        assert f"replaced by a new master (pid {pid})" in done.stdout
        # Queued before the helper exited: systemd knows the new main pid
        # before it sees the reload command end.
        sd.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(sd.recv(4096).decode())
            except BlockingIOError:
                break
        assert f"MAINPID={pid}\nREADY=1\n" in messages, messages
        missing = helper(env, "replace", "1.any")
        assert missing.returncode == 78 and "no line for instance 1.any" in missing.stderr
    finally:
        sd.close()
        env["BALANCE_BIN"] = REAL_BALANCE
        pid = instances_pid(env, f"{p1}.127.0.0.1")
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def test_status_without_instances_or_file(tmp_path):
    env = helper_env(tmp_path, "# nothing\n")
    done = helper(env, "status")
    assert done.returncode == 3 and "no instances configured" in done.stdout
    env["BALANCE_CONF"] = str(tmp_path / "missing.conf")
    done = helper(env, "status")
    assert done.returncode == 4
    assert done.stderr.startswith("balance: cannot read ") and "Traceback" not in done.stderr
    assert helper(env, "start").returncode == 78
    bad = helper(env, "frobnicate")
    assert bad.returncode == 2 and bad.stderr.startswith("usage: balance-instances ")


def test_problems_carry_journal_priorities_under_systemd(tmp_path):
    """On the journal stream (JOURNAL_STREAM = our stderr) bad lines are warnings: "<4>..."."""
    env = helper_env(tmp_path, "8080 a\n-x 1 2\n")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        done = subprocess.run([sys.executable, "-m", "gbalance.service.instances", "check"], env=env, stderr=err,
                              stdout=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0
    lines = err_path.read_text().splitlines()
    assert lines and all(line.startswith("<4>balance: ") for line in lines), lines
    assert "line 2: not a valid balance command line" in lines[0]
    # Not the journal (stderr is another file): plain text.
    plain = helper(env, "check")
    assert plain.stderr.startswith("balance: ") and "<4>" not in plain.stderr


def test_metrics_files_for_the_textfile_collector(tmp_path, backends):
    """One .prom file per running instance, renamed into place; gone when the instance stops."""
    a, b = backends("A"), backends("B")
    p1, p2 = free_port(), free_port()
    env = helper_env(tmp_path, f"{p1} {a.spec}\n-b 127.0.0.1 {p2} {b.spec}\n{free_port()} c\n")
    textfile = tmp_path / "node-exporter"
    textfile.mkdir()
    (textfile / "other.prom").write_text("# another exporter's file\n")
    (textfile / f"balance_{p2}.any.prom").write_text("stale\n")   # an instance no longer configured
    try:
        start = helper(env, "start")
        assert len(re.findall(r"started \(pid \d+\)", start.stdout)) == 2   # line 3 fails to resolve
        assert read_tag(p2) == "B"
        done = helper(env, "metrics", str(textfile))
        assert done.returncode == 0, done.stderr
        names = sorted(p.name for p in textfile.iterdir())
        assert names == sorted([f"balance_{p1}.any.prom", f"balance_{p2}.127.0.0.1.prom", "other.prom"]), names
        text = (textfile / f"balance_{p2}.127.0.0.1.prom").read_text()
        direct = subprocess.run([REAL_BALANCE, "-b", "127.0.0.1", "-c", "metrics", str(p2)], env=env,
                                capture_output=True, text=True, timeout=30).stdout
        assert text == direct and re.search(r"^# TYPE balance_\w+ (gauge|counter)$", text, re.M), text
        assert oct((textfile / f"balance_{p1}.any.prom").stat().st_mode & 0o777) == "0o644"

        helper(env, "stop")
        assert helper(env, "metrics", str(textfile)).returncode == 0
        assert sorted(p.name for p in textfile.iterdir()) == ["other.prom"]
        missing = helper(env, "metrics", str(tmp_path / "nowhere"))
        assert missing.returncode == 1 and "cannot read" in missing.stderr
    finally:
        stop_all(env)


def test_hostile_config_files_never_trace_back(tmp_path):
    """Binary junk, a directory, an unwritable generator target: one-line messages, no traceback."""
    env = helper_env(tmp_path, "")
    (tmp_path / "balance.conf").write_bytes(b"\xff\xfe\x00junk\n8080 a\n" + b"x" * 100000 + b"\n\t'\n")
    done = helper(env, "list")
    assert done.returncode == 0 and done.stdout.splitlines() == ["2 8080.any 8080 a"]
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 3, done.stderr
    env["BALANCE_CONF"] = str(tmp_path)   # a directory
    for action, code in (("start", 78), ("status", 4), ("list", 78)):
        bad = helper(env, action)
        assert bad.returncode == code and bad.stderr.startswith("balance: cannot read ") and "Traceback" not in bad.stderr
    env["BALANCE_CONF"] = str(tmp_path / "balance.conf")
    blocker = tmp_path / "gen"
    blocker.write_text("a file where the generator wants a directory\n")
    gen = helper(env, "generate", str(blocker))
    assert gen.returncode == 1 and "balance-generator: cannot write into" in gen.stderr
    assert "Traceback" not in gen.stderr
