"""systemd: the units' commands and the generator.

``exec`` is ExecStart (the helper becomes ``balance -f <line>``, the same
process), ``replace`` ExecReload (``balance -r <line>``, then ``MAINPID=``
for the new master, sent with :func:`gbalance.system.notify.send`) and
``generate`` the generator that makes balance.service want one
``balance@<instance>.service`` per line.  Environment: BALANCE_UNIT_DIR
(where the generator's links point).
"""

from __future__ import annotations

import os
from syslog import LOG_WARNING

from gbalance.config import DEFAULT_GRACE
from gbalance.service.conffile import EX_CONFIG, Out, conf_path, find, read_config
from gbalance.service.masters import balance_bin, run_balance
from gbalance.system.child import SAFE_CWD
from gbalance.system.notify import NOTIFY_ENV, send, socket_address

TEMPLATE = "balance@.service"


def unit_dir() -> str:
    """Where balance@.service lives (Debian's /lib or Fedora's /usr/lib)."""
    if os.environ.get("BALANCE_UNIT_DIR"):
        return os.environ["BALANCE_UNIT_DIR"]
    for d in ("/lib/systemd/system", "/usr/lib/systemd/system"):
        if os.path.exists(os.path.join(d, TEMPLATE)):
            return d
    return "/usr/lib/systemd/system"


def do_replace(key: str, out: Out) -> int:
    """systemd ExecReload: ``balance -r <line>``, then tell systemd the new main pid.

    The old master may exit (nothing left to drain) before the new one has
    said ``MAINPID=`` itself; systemd must learn the new pid before this
    reload command exits, or it would take the service for stopped.  So
    the new master's pid, read from its state file, is sent from here
    (``NotifyAccess=exec`` accepts it from this reload command), before we exit.
    """
    inst = find(key, out)
    if inst is None:
        return EX_CONFIG
    pid = run_balance(inst, conf_path(), out, "-r")
    if pid is None:
        return 1
    # $NOTIFY_SOCKET as systemd set it for this reload command (not unset: we exit now).
    send(socket_address(os.environ.get(NOTIFY_ENV, "")), f"MAINPID={pid}\nREADY=1\n", timeout=1.0)
    out.say(f"balance {key}: replaced by a new master (pid {pid})")
    return 0


def do_exec(key: str, out: Out, *mode: str) -> int:
    """Become ``balance <mode> <line>`` (systemd keeps the same process)."""
    inst = find(key, out)
    if inst is None:
        return EX_CONFIG
    argv = [balance_bin(), *mode, *inst.args]
    try:
        os.chdir(SAFE_CWD)
        os.execv(argv[0], argv)
    except OSError as exc:
        out.problem(f"balance {key}: cannot run {argv[0]}: {exc.strerror}")
    return EX_CONFIG


def do_generate(normal_dir: str, out: Out) -> int:
    """systemd generator: make balance.service want one balance@KEY per line.

    A line with its own grace period (-g) gets a drop-in raising the unit's
    TimeoutStopSec, so systemd never kills a master that is still draining.
    """
    try:
        cfg = read_config()
    except OSError:
        return 0
    for p in cfg.problems:
        out.problem(f"balance-generator: {p}", LOG_WARNING)
    wants = os.path.join(normal_dir, "balance.service.wants")
    target = os.path.join(unit_dir(), TEMPLATE)
    try:
        os.makedirs(wants, exist_ok=True)
        for inst in cfg.instances:
            unit = f"balance@{inst.key}.service"
            link = os.path.join(wants, unit)
            if not os.path.lexists(link):
                os.symlink(target, link)
            if inst.grace != DEFAULT_GRACE:
                dropin = os.path.join(normal_dir, unit + ".d")
                os.makedirs(dropin, exist_ok=True)
                with open(os.path.join(dropin, "50-grace.conf"), "w", encoding="utf-8") as f:
                    f.write(f"# From {cfg.path} line {inst.line}: -g {inst.grace:g}\n"
                            f"[Service]\nTimeoutStopSec={inst.stop_timeout}\n")
    except OSError as exc:
        out.problem(f"balance-generator: cannot write into {normal_dir}: {exc.strerror}")
        return 1
    return 0
