"""The master's listening socket: its accept queue is as large as the system allows.

A master asks the kernel for ``LISTEN_BACKLOG``; the kernel cuts that to
``net.core.somaxconn``.  So an administrator who raises the sysctl for connect
storms gets the larger queue.  Run in a network namespace of the test's own,
whose somaxconn is set without touching the host's.
"""

from __future__ import annotations

from conftest import free_port, run_in_netns

from gbalance.system.limits import LISTEN_BACKLOG

SCRIPT = r'''
import os, signal, subprocess, sys, time
port, somaxconn = sys.argv[1], sys.argv[2]
with open("/proc/sys/net/core/somaxconn", "w") as f:   # this namespace's own copy
    f.write(somaxconn)
proc = subprocess.Popen([sys.executable, "-m", "gbalance", "-f", port, "127.0.0.1:9"],
                        stderr=subprocess.PIPE)
try:
    for _ in range(400):             # up to 20 s: a loaded machine starts Python slowly
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout.split()
        if out:
            print(out[2])
            break
        time.sleep(0.05)
    else:
        print("not listening", proc.poll(), file=sys.stderr)
finally:
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=10)
'''


def listen_backlog(netns, tmp_path, somaxconn: int) -> int:
    script = tmp_path / "backlog.py"
    script.write_text(SCRIPT)
    r = run_in_netns(netns, tmp_path, script, str(free_port()), str(somaxconn))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return int(r.stdout.split()[0])


def test_backlog_follows_a_raised_somaxconn(netns, tmp_path):
    # Above the 4096 of socket.SOMAXCONN: a storm of 20,000 connects needs room.
    assert listen_backlog(netns, tmp_path, 30000) == 30000


def test_backlog_is_capped_by_somaxconn_and_by_what_the_master_asks(netns, tmp_path):
    assert listen_backlog(netns, tmp_path, 200) == 200
    assert listen_backlog(netns, tmp_path, LISTEN_BACKLOG + 1000) == LISTEN_BACKLOG
