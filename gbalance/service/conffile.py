"""/etc/balance.conf: its lines read as balance would read them, and what is wrong with them.

Each line is split like a shell command line (quotes work, "#" starts a
comment) and parsed with balance's own usage text, so a line is valid here
exactly when ``balance`` would start a proxy from it.  An instance is named
after its state file (``files.state_path``), "<port>.<bind address or
any>", because that pair is what makes two balance masters distinct: the
name is stable when lines move, and "balance -c show PORT" finds the same
master.  Host names are not resolved (a systemd generator runs before the
network is up).  Environment: BALANCE_CONF (the config file).
"""

from __future__ import annotations

import enum
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from syslog import LOG_ERR

from docopt import DocoptExit, docopt

from gbalance.cli import USAGE as BALANCE_USAGE
from gbalance.config import DEFAULT_GRACE
from gbalance.errors import BalanceError
from gbalance.log import journal_stderr
from gbalance.arguments import parse_port, parse_seconds
from gbalance.table.files import state_path

DEFAULT_CONF = "/etc/balance.conf"
#: What stop and the units allow beyond the grace period (exit, clean-up).
STOP_MARGIN = 15.0
#: Options that belong to the init system, never to a line of the file.
FORBIDDEN = {"-f": "-f is not allowed here (the init system decides)",
             "-r": "-r is not allowed here (restart and reload use it)"}


class Lsb(enum.IntEnum):
    """Exit codes of an init script's ``status``."""

    OK = 0
    DEAD_WITH_FILE = 1
    NOT_RUNNING = 3
    UNKNOWN = 4


#: The exit code for a config file that cannot be read or has bad lines (sysexits' EX_CONFIG).
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
        opts = docopt(BALANCE_USAGE, argv=args, help=False, version=None)
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


def load(out: Out, status: bool = False) -> Config:
    """read_config, or one clear line and LSB status 4 / EX_CONFIG."""
    try:
        return read_config()
    except OSError as exc:
        out.problem(f"balance: cannot read {conf_path()}: {exc.strerror}")
        raise SystemExit(Lsb.UNKNOWN if status else EX_CONFIG)


def find(key: str, out: Out) -> Instance | None:
    for inst in load(out).instances:
        if inst.key == key:
            return inst
    out.problem(f"balance: no line for instance {key} in {conf_path()} (edit it, then systemctl daemon-reload)")
    return None
