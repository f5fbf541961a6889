"""The SysV init script's actions over /etc/balance.conf: start, stop, restart, status...

``restart`` never refuses a connection: it starts a new master with ``-r``
for every line, which takes the listening socket over from the running
one; the old master drains its open connections for up to its grace
period (``-g``, 30 seconds by default) and exits.  ``stop`` lets every
master drain at the same time and waits for the longest grace period.
Exit codes of ``status`` are the LSB's (:class:`~gbalance.service.conffile.Lsb`).
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from syslog import LOG_WARNING

from gbalance.config import DEFAULT_GRACE
from gbalance.service.conffile import EX_CONFIG, STOP_MARGIN, Lsb, Out, load, read_config
from gbalance.service.masters import (MasterRef, find_master, master_pid, read_record, record_path,
                                      run_balance, signal_master, write_record)


def stop_keys(keys: list[str], grace: dict[str, float], out: Out,
              margin: float = STOP_MARGIN) -> list[str]:
    """SIGTERM every live master of ``keys`` at once, wait for each to drain and exit.

    A master still there after its grace period plus ``margin`` is killed.
    """
    waiting: dict[str, MasterRef] = {}
    for key in keys:
        ref, _ = find_master(key)
        if ref is None or not signal_master(ref, signal.SIGTERM):
            continue
        waiting[key] = ref
        out.say(f"balance {key}: stopping (pid {ref.pid}); waiting up to "
                f"{grace.get(key, DEFAULT_GRACE) + margin:.0f} s for its open connections to close")
    start = time.monotonic()
    stopped = []
    while waiting:
        for key, ref in list(waiting.items()):
            if not ref.still_there():
                out.say(f"balance {key}: stopped (pid {ref.pid})")
                stopped.append(key)
                del waiting[key]
            elif time.monotonic() - start > grace.get(key, DEFAULT_GRACE) + margin:
                if signal_master(ref, signal.SIGKILL):
                    out.problem(f"balance {key}: killed (pid {ref.pid}) after "
                                f"{time.monotonic() - start:.0f}s", LOG_WARNING)
                else:
                    out.say(f"balance {key}: stopped (pid {ref.pid})")
                stopped.append(key)
                del waiting[key]
        if waiting:
            time.sleep(0.05)
    return stopped


def do_start(out: Out) -> int:
    cfg = load(out)
    for p in cfg.problems:
        out.problem(f"balance: {p}")
    if not cfg.instances and not cfg.problems:
        out.say(f"balance: no instances configured in {cfg.path}")
    ok = []
    for inst in cfg.instances:
        pid, _ = master_pid(inst.key)
        if pid:
            out.say(f"balance {inst.key}: already running (pid {pid})")
        else:
            started = run_balance(inst, cfg.path, out)
            if started is None:
                continue
            out.say(f"balance {inst.key}: started (pid {started})")
        ok.append(inst.key)
    write_record(sorted(set(read_record()) | set(ok)), out)
    return 0 if len(ok) == len(cfg.instances) and not cfg.problems else 1






def do_stop(out: Out) -> int:
    try:
        instances = read_config().instances
    except OSError:
        instances = []
    grace = {i.key: i.grace for i in instances}
    keys = list(dict.fromkeys([i.key for i in instances] + read_record()))
    if not stop_keys(keys, grace, out):
        out.say("balance: no instance was running")
    try:
        os.unlink(record_path())
    except OSError:
        pass
    return 0


def do_restart(out: Out) -> int:
    """Hand every instance over to a new master (``balance -r``); start missing ones.

    Instances started earlier whose line is gone are stopped.  No
    connection is refused: each new master takes the listening socket over
    from the old one, which drains its open connections and exits.
    """
    cfg = load(out)
    for p in cfg.problems:
        out.problem(f"balance: {p}")
    current = {i.key for i in cfg.instances}
    gone = [k for k in read_record() if k not in current]
    if gone:
        stop_keys(gone, {}, out)
    ok = []
    for inst in cfg.instances:
        old, _ = master_pid(inst.key)
        pid = run_balance(inst, cfg.path, out, "-r")
        if pid is None:
            continue
        if old and old != pid:
            out.say(f"balance {inst.key}: restarted (pid {pid}; pid {old} drains its connections)")
        else:
            out.say(f"balance {inst.key}: started (pid {pid})")
        ok.append(inst.key)
    write_record(sorted(ok), out)
    return 0 if len(ok) == len(cfg.instances) and not cfg.problems else 1


def do_status(out: Out) -> int:
    cfg = load(out, status=True)
    for p in cfg.problems:
        out.say(f"balance: {p}")
    if not cfg.instances:
        out.say(f"balance: no instances configured in {cfg.path}")
        return Lsb.NOT_RUNNING
    running = stale = 0
    for inst in cfg.instances:
        pid, exists = master_pid(inst.key)
        if pid:
            running += 1
            out.say(f"balance {inst.key}: running (pid {pid})")
        elif exists:
            stale += 1
            out.say(f"balance {inst.key}: dead, but its state file remains")
        else:
            out.say(f"balance {inst.key}: not running")
    if running == len(cfg.instances):
        return Lsb.OK
    return Lsb.DEAD_WITH_FILE if stale else Lsb.NOT_RUNNING


def do_list(out: Out) -> int:
    cfg = load(out)
    for p in cfg.problems:
        out.problem(f"balance: {p}")
    for inst in cfg.instances:
        out.say(f"{inst.line} {inst.key} {shlex.join(inst.args)}")
    return 0


def do_check(out: Out) -> int:
    cfg = load(out)
    for p in cfg.problems:
        out.problem(f"balance: {p}", LOG_WARNING)
    out.say(f"balance: {len(cfg.instances)} instance(s) in {cfg.path}")
    return 0


def do_verify(out: Out) -> int:
    """The init script's ``check``: every bad line on stderr, EX_CONFIG if any; starts nothing."""
    cfg = load(out)
    for p in cfg.problems:
        out.problem(f"balance: {p}")
    if cfg.problems:
        return EX_CONFIG
    out.say(f"balance: {cfg.path}: {len(cfg.instances)} instance(s), every line valid")
    return 0
