"""The proxies of /etc/balance.conf: one reader for the init script and systemd.

``balance-instances`` (installed by the OS packages as
/usr/lib/gbalance/balance-instances) serves both init systems, so that both
read the file the same way::

  balance-instances list               valid lines: "<line> <instance> <arguments>"
  balance-instances check              report bad lines, exit 0 (for systemd)
  balance-instances verify             report bad lines, exit 78 if any (init script "check")
  balance-instances start|stop|status  the SysV init script's actions
  balance-instances restart            hand every instance over to a new master (-r)
  balance-instances exec INSTANCE      systemd ExecStart: become "balance -f <arguments>"
  balance-instances replace INSTANCE   systemd ExecReload: "balance -r <arguments>", MAINPID=
  balance-instances generate DIR ...   systemd generator: one balance@ unit per line
  balance-instances metrics DIR        node_exporter textfile collector files
  balance-instances health             exit 0 only if every instance is up and accepting

An instance is named after its state file (``state.state_path``),
"<port>.<bind address or any>", because that pair is what makes two balance
masters distinct: the name is stable when lines move, and
"balance -c show PORT" finds the same master.  Each line is split like a
shell command line (quotes work, "#" starts a comment).  Stopping uses the
master pid recorded in each instance's state file, and only while that
master is alive, so nothing is ever killed by name.  Only state files and
an ``init-instances`` record owned by this user (root) are trusted, only
keys of the ``PORT.ADDR`` form are read from the record (written through
mkstemp and rename), and pid, start time and command line are checked
again right before every signal, SIGKILL included.  Every balance it runs
starts in ``/``.

Restarts never refuse a connection: ``restart`` (and systemd's reload) start
a new master with ``-r``, which takes the listening socket over from the
running one; the old master drains its open connections for up to its grace
period (``-g``, 30 seconds by default) and exits.  ``stop`` lets every
master drain at the same time and waits for the longest grace period.

Environment (for tests and unusual setups): BALANCE_CONF (the config file),
BALANCE_BIN (the balance command), BALANCE_STATE_DIR (as for balance),
BALANCE_UNIT_DIR (where the generator's links point).
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from syslog import LOG_ERR, LOG_WARNING

from docopt import DocoptExit, docopt

from gbalance import cli
from gbalance.system.child import SAFE_CWD
from gbalance.config import DEFAULT_GRACE
from gbalance.errors import BalanceError
from gbalance.log import journal_stderr
from gbalance.spec import parse_port, parse_seconds
from gbalance.table.state import (H_START_TICKS, SharedState, StateError, check_directory,
                            master_process_alive, state_dir, state_path)

DEFAULT_CONF = "/etc/balance.conf"
RECORD = "init-instances"      # keys started by the init script, in the state dir
#: What stop and the units allow beyond the grace period (exit, clean-up).
STOP_MARGIN = 15.0
START_TIMEOUT = 60.0
TEMPLATE = "balance@.service"
#: Options that belong to the init system, never to a line of the file.
FORBIDDEN = {"-f": "-f is not allowed here (the init system decides)",
             "-r": "-r is not allowed here (restart and reload use it)"}


class Lsb(enum.IntEnum):
    """Exit codes of an init script's ``status``."""

    OK = 0
    DEAD_WITH_FILE = 1
    NOT_RUNNING = 3
    UNKNOWN = 4


EX_CONFIG = 78


@dataclass(frozen=True)
class Instance:
    """One valid line of the config file."""

    line: int
    key: str
    args: tuple[str, ...]
    grace: float = DEFAULT_GRACE
    port: int = 0
    bind: str | None = None

    @property
    def stop_timeout(self) -> int:
        """Seconds an init system should wait for this master to stop."""
        return math.ceil(self.grace + STOP_MARGIN)


@dataclass
class Config:
    """The instances of a file and one message per bad line."""

    path: str
    instances: list[Instance]
    problems: list[str]


#: Bytes no command line holds (tabs are blanks); a NUL would even reach getservbyname.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ConfigError(Exception):
    """A line that cannot become an instance."""


def conf_path() -> str:
    return os.environ.get("BALANCE_CONF") or DEFAULT_CONF


def balance_bin() -> str:
    """The balance command: $BALANCE_BIN, the one beside this script, or /usr/sbin/balance."""
    if os.environ.get("BALANCE_BIN"):
        return os.environ["BALANCE_BIN"]
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0] or ".")), "balance")
    if os.path.basename(sys.argv[0] or "") == "balance-instances" and os.access(beside, os.X_OK):
        return beside
    return "/usr/sbin/balance"


def unit_dir() -> str:
    """Where balance@.service lives (Debian's /lib or Fedora's /usr/lib)."""
    if os.environ.get("BALANCE_UNIT_DIR"):
        return os.environ["BALANCE_UNIT_DIR"]
    for d in ("/lib/systemd/system", "/usr/lib/systemd/system"):
        if os.path.exists(os.path.join(d, TEMPLATE)):
            return d
    return "/usr/lib/systemd/system"


def parse_line(args: list[str]) -> tuple[str, float]:
    """(instance name, grace seconds) of a balance command line, or raise ConfigError."""
    inst = parse_args(args)
    return inst.key, inst.grace


def parse_args(args: list[str], line: int = 0) -> Instance:
    """The instance of a balance command line, or raise ConfigError.

    Only the port, -b and -g matter; host names are not resolved here (a
    generator runs before the network is up), balance itself checks them.
    """
    try:
        opts = docopt(cli.USAGE, argv=args, help=False, version=None)
    except DocoptExit:
        raise ConfigError("not a valid balance command line")
    if opts["-i"] or opts["-c"] is not None or opts["--help"] or opts["--version"]:
        raise ConfigError("-i, -c, -h and --version do not start a proxy")
    for option, why in FORBIDDEN.items():
        if opts.get(option):
            raise ConfigError(why)
    try:
        port = parse_port(opts["<port>"])
        grace = parse_seconds(opts["-g"], "-g") if opts.get("-g") is not None else DEFAULT_GRACE
    except BalanceError as exc:
        raise ConfigError(exc.message)
    except (ValueError, OSError) as exc:   # whatever a service-name lookup may raise
        raise ConfigError(f"invalid port [{opts['<port>']}]: {exc}")
    key = os.path.basename(state_path(port, opts["-b"], directory="/"))[len("balance."):]
    return Instance(line, key, tuple(args), grace, port, opts["-b"])


def read_config(path: str | None = None) -> Config:
    """Valid instances and one message per bad line (duplicates are bad too).

    Raises OSError when the file cannot be read.
    """
    path = path or conf_path()
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    cfg = Config(path, [], [])
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if CONTROL_CHARS.search(text):
            cfg.problems.append(f"{path} line {number}: control characters in the line")
            continue
        try:
            args = shlex.split(text, comments=True)
        except ValueError as exc:
            cfg.problems.append(f"{path} line {number}: {exc}")
            continue
        if not args:
            continue
        try:
            inst = parse_args(args, number)
        except ConfigError as exc:
            cfg.problems.append(f"{path} line {number}: {exc}: {text.strip()}")
            continue
        if inst.key in seen:
            cfg.problems.append(f"{path} line {number}: port and address already used on line {seen[inst.key]}")
            continue
        seen[inst.key] = number
        cfg.instances.append(inst)
    return cfg


# -- output ------------------------------------------------------------------------

class Out:
    """Messages of the helper: stdout for progress, stderr for problems.

    On the journal (systemd) every stderr line carries its priority.
    """

    def __init__(self) -> None:
        self.journal = journal_stderr()

    def say(self, text: str) -> None:
        print(text, flush=True)

    def problem(self, text: str, priority: int = LOG_ERR) -> None:
        line = f"<{priority}>{text}" if self.journal else text
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


# -- masters -----------------------------------------------------------------------

#: An instance key: "<port>.<bind address or any>" as state.state_path spells it.
KEY = re.compile(r"[1-9][0-9]{0,4}\.[A-Za-z0-9:_-][A-Za-z0-9.:_-]{0,254}")


def valid_key(key: str) -> bool:
    """True for a key of the ``PORT.ADDR`` form (no path, no "..")."""
    return bool(KEY.fullmatch(key)) and int(key.split(".", 1)[0]) <= 65535 and ".." not in key


@dataclass(frozen=True)
class MasterRef:
    """A live master as its state file recorded it: pid and process start time."""

    key: str
    pid: int
    ticks: int

    def still_there(self) -> bool:
        """True while ``pid`` is that very balance master: same start time, a
        balance command line (checked again right before every signal)."""
        return master_process_alive(self.pid, self.ticks)


def find_master(key: str) -> tuple[MasterRef | None, bool]:
    """(the live master of ``key`` or None, state file exists).

    Only a key of the ``PORT.ADDR`` form and a state file owned by this
    user (root, for the init script) are trusted: a master of another user
    is none of the init script's business, and its file could name any pid.
    """
    if not valid_key(key):
        return None, False
    path = os.path.join(state_dir(), "balance." + key)
    if not os.path.lexists(path):
        return None, False
    try:
        st = SharedState.attach(path)
    except StateError:
        return None, True
    try:
        if st.owner != os.geteuid():
            return None, True
        pid, ticks = st.pid, st.q[H_START_TICKS]
        if not st.master_alive() or not master_process_alive(pid, ticks):
            return None, True
        return MasterRef(key, pid, ticks), True
    finally:
        st.close()


def master_pid(key: str) -> tuple[int, bool]:
    """(pid, state file exists) of the live master of ``key``; pid 0 if none."""
    ref, exists = find_master(key)
    return (ref.pid if ref else 0), exists


def record_path() -> str:
    return os.path.join(state_dir(), RECORD)


def read_record() -> list[str]:
    """Instance keys the init script started earlier (lines may be gone now).

    Only a plain file of this user (never through a symbolic link) is
    read, and only keys of the ``PORT.ADDR`` form are taken from it.
    """
    try:
        fd = os.open(record_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return []
        data = os.read(fd, 1 << 16)
    except OSError:
        return []
    finally:
        os.close(fd)
    return [k for k in data.decode("ascii", "replace").split() if valid_key(k)]


def write_record(keys: list[str], out: Out) -> None:
    """Replace the record: a new private file (mkstemp) renamed over the old one."""
    directory = state_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        check_directory(directory)
        fd, tmp = tempfile.mkstemp(prefix=f".{RECORD}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(k + "\n" for k in keys if valid_key(k)))
                os.fchmod(f.fileno(), 0o644)
            os.rename(tmp, record_path())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except StateError as exc:
        out.problem(f"balance: cannot write {record_path()}: {exc}")
    except OSError as exc:
        out.problem(f"balance: cannot write {record_path()}: {exc.strerror}")


def run_balance(inst: Instance, conf: str, out: Out, *extra: str) -> int | None:
    """Run ``balance [extra] <line>`` (it detaches); the new master's pid, or None.

    A proxy that did not come up is reported: balance's own start-up error
    (exit code and message), or a master that is gone right after start.
    """
    argv = [balance_bin(), *extra, *inst.args]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=START_TIMEOUT, cwd=SAFE_CWD)
    except (OSError, subprocess.TimeoutExpired) as exc:
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: cannot start: {exc}")
        return None
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or "no message"
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: failed (exit {done.returncode}): {why}")
        return None
    pid, _ = master_pid(inst.key)
    if not pid:
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: the master exited right after starting")
        return None
    return pid


def load(out: Out, status: bool = False) -> Config:
    """read_config, or one clear line and LSB status 4 / EX_CONFIG."""
    try:
        return read_config()
    except OSError as exc:
        out.problem(f"balance: cannot read {conf_path()}: {exc.strerror}")
        raise SystemExit(Lsb.UNKNOWN if status else EX_CONFIG)


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


def stop_keys(keys: list[str], grace: dict[str, float], out: Out) -> list[str]:
    """SIGTERM every live master of ``keys`` at once, wait for each to drain and exit.

    A master still there after its grace period plus a margin is killed.
    """
    waiting: dict[str, MasterRef] = {}
    for key in keys:
        ref, _ = find_master(key)
        if ref is None or not signal_master(ref, signal.SIGTERM):
            continue
        waiting[key] = ref
        out.say(f"balance {key}: stopping (pid {ref.pid}); waiting up to "
                f"{grace.get(key, DEFAULT_GRACE) + STOP_MARGIN:.0f} s for its open connections to close")
    start = time.monotonic()
    stopped = []
    while waiting:
        for key, ref in list(waiting.items()):
            if not ref.still_there():
                out.say(f"balance {key}: stopped (pid {ref.pid})")
                stopped.append(key)
                del waiting[key]
            elif time.monotonic() - start > grace.get(key, DEFAULT_GRACE) + STOP_MARGIN:
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


def signal_master(ref: MasterRef, sig: int) -> bool:
    """Send ``sig`` to the master of ``ref`` if the pid is still that master; True if sent.

    Checked right before the signal: pid, start time and a balance command
    line, so a pid that was reused (or a process that became something
    else) is never signalled.
    """
    if not ref.still_there():
        return False
    try:
        os.kill(ref.pid, sig)
    except ProcessLookupError:
        return False
    return True


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


def find(key: str, out: Out) -> Instance | None:
    for inst in load(out).instances:
        if inst.key == key:
            return inst
    out.problem(f"balance: no line for instance {key} in {conf_path()} (edit it, then systemctl daemon-reload)")
    return None


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's ``$NOTIFY_SOCKET``; False when there is none or it fails."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@") and len(address) > 1:
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            sock.sendto(message.encode("utf-8"), address)
        return True
    except OSError:
        return False


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
    sd_notify(f"MAINPID={pid}\nREADY=1\n")
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


def metrics_name(key: str) -> str:
    """The textfile collector file of one instance: ``balance_<key>.prom``."""
    return "balance_" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".prom"


def do_metrics(directory: str, out: Out) -> int:
    """Write the metrics of every running instance into ``directory``.

    For node_exporter's textfile collector: one file per instance (each
    file's HELP/TYPE lines stand alone), rendered here from the instance's
    state file (mapped read-only when the file system is: the unit runs
    sandboxed).  The directory is opened once and refused when others may
    write to it; every file is written relative to that descriptor as a
    temporary file renamed over the old one (the collector never reads half
    a file), and only a file balance wrote is replaced.  Files of instances
    that are gone or not running are removed.
    """
    from gbalance.shell.render import metrics_text, open_metrics_dir, write_metrics_at

    cfg = load(out)
    try:
        dir_fd = open_metrics_dir(directory)
    except OSError as exc:
        out.problem(f"balance: cannot read {directory}: {exc.strerror or exc}")
        return 1
    try:
        return _write_metrics(cfg, dir_fd, out, metrics_text, write_metrics_at)
    finally:
        os.close(dir_fd)


def _write_metrics(cfg: Config, dir_fd: int, out: Out, render, write) -> int:
    written: set[str] = set()
    failed = 0
    for inst in cfg.instances:
        ref, _ = find_master(inst.key)
        if ref is None:
            continue
        name = metrics_name(inst.key)
        try:
            st = SharedState.attach(os.path.join(state_dir(), "balance." + inst.key))
        except StateError as exc:
            out.problem(f"balance {inst.key}: metrics: {exc}", LOG_WARNING)
            failed += 1
            continue
        try:
            text = render(st, inst.port, inst.bind)
        finally:
            st.close()
        try:
            write(dir_fd, name, text)
        except OSError as exc:
            out.problem(f"balance {inst.key}: metrics: {exc.strerror or exc}", LOG_WARNING)
            failed += 1
            continue
        written.add(name)
    try:
        stale = [n for n in os.listdir(dir_fd)
                 if n.startswith("balance_") and n.endswith(".prom") and n not in written]
    except OSError as exc:
        out.problem(f"balance: cannot read the metrics directory: {exc.strerror}")
        return 1
    for name in stale:
        with contextlib.suppress(OSError):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.unlink(name, dir_fd=dir_fd)
    return 1 if failed else 0


USAGE = ("usage: balance-instances start|stop|restart|status|list|check|verify"
         " | exec INSTANCE | replace INSTANCE | generate DIR... | metrics DIR | health")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``balance-instances``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    out = Out()
    actions = {"start": do_start, "stop": do_stop, "restart": do_restart, "status": do_status,
               "list": do_list, "check": do_check, "verify": do_verify}
    try:
        if len(argv) == 1 and argv[0] in actions:
            return int(actions[argv[0]](out))
        if len(argv) == 2 and argv[0] == "exec":
            return do_exec(argv[1], out, "-f")
        if len(argv) == 2 and argv[0] == "replace":
            return do_replace(argv[1], out)
        if len(argv) >= 2 and argv[0] == "generate":
            return do_generate(argv[1], out)
        if len(argv) == 2 and argv[0] == "metrics":
            return do_metrics(argv[1], out)
        if argv == ["health"]:   # keepalived's vrrp_script (gbalance.health)
            from gbalance.service import health
            return health.run(out)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, never a traceback
        out.problem(f"balance-instances: internal error: {type(exc).__name__}: {exc}")
        return 70
    out.problem(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
