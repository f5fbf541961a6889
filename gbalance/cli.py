"""The ``balance`` command line: argv to a config, then run it.

We use docopt 0.6.2, the version Debian ships, on purpose: docopt-ng reads a
lone ``-6`` as a negative number (a positional argument), which would break
``balance -6 80 host``.  ``tests/test_cli.py`` pins this down.
"""

from __future__ import annotations

import sys

from docopt import DocoptExit, docopt

from gbalance import __version__
from gbalance.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_GRACE, ProxyConfig, ShellConfig
from gbalance.errors import EX_SOFTWARE, EX_USAGE, BalanceError
from gbalance.proxy.frontdoor import parse_frontdoor
from gbalance.log import LOG_ERR, write_stderr
from gbalance.monitor.monspec import parse_monitor
from gbalance.proxy.proxyproto import parse_version
from gbalance.arguments import parse_groups, parse_keepalive, parse_limit, parse_port, parse_seconds, parse_workers
from gbalance.table.layout import MAXWORKERS

USAGE = """\
Usage:
  balance [-b addr] [-B addr] [-t sec] [-T sec] [-m spec] [-k t,i,p] [-K t,i,p] [-g sec] [-P ver] [-A spec] [-w n] [-L max] [-l max] [-adfpHMr6] <port> [<channel>...]
  balance [-b addr] -i [-d] [-M] <port>
  balance [-b addr] -c cmd [-d] [-M] <port>
  balance (-h | --help | --version)

A channel is host[:port[:maxc]] (IPv6: [addr]:port:maxc).  Between
channels, "!" starts a new failover group and "%" makes the group before it
a client-address hash group.

Options:
  -6          Listen on IPv6 (dual stack "::" unless -b is given).
  -A spec     Accept the PROXY protocol (v1 or v2) from a front tier: each
              client must start with a header, whose client address is used
              instead of the connection's.  spec: "any" or the front tier's
              addresses/networks (others are refused), comma-separated, and
              optionally timeout=SEC for the header (3 by default).
  -a          Autodisable: a channel whose connect fails is soft-disabled.
  -b addr     Listen on this address instead of all addresses.
  -B addr     Make outgoing connections from this source address.
  -c cmd      Send one control command to the running master and exit.
  -d          Debug: trace channels and connection attempts on stderr.
  -f          Stay in the foreground (default: detach and log to syslog).
  -g sec      Grace period after SIGTERM: open connections may finish for
              this long, then are reset (0 = at once) [default: 30].
  -H          Hash failover: a failed hash channel tries the client's next one.
  -i          Interactive control shell for the running master.
  -k t,i,p    Client-side TCP keepalive: idle secs, interval secs, probes.
  -K t,i,p    Server-side TCP keepalive: idle secs, interval secs, probes.
  -l max      At most max connections open at once from one client address
              (IPv6: one /64 network); more are reset at once (0 = no
              limit) [default: 0].
  -L max      At most max connections open at once (pending or linked);
              more wait in the listen backlog.  Default: what the file
              descriptor limit allows; 0 = no limit.  With -w n each worker
              takes max/n.
  -m spec     Monitor channels, e.g. connect:interval=10 (see balance(1)).
  -M          Accepted for compatibility (state is always a mapped file).
  -p          Packet dump: print all forwarded data on stdout.
  -P ver      Start each backend connection with a PROXY protocol header
              telling the client's address and port; ver is v1 (text) or v2
              (binary).  Health checks (-m connect) send one too.
  -r          Replace the master running on this port and address: take
              over its listening socket (no connection is refused) while it
              finishes its open connections as on SIGTERM.  Channel states,
              maxc, created channels and counters carry over.
  -t sec      Connect timeout in seconds [default: 5].
  -T sec      Close connections idle this many seconds (0 = never): with a
              FIN if nothing was in flight, else with a reset [default: 0].
  -w n        Worker processes accepting on the port, each on its own core
              ("auto": one per usable CPU); the master supervises them
              [default: 1].
  -h --help   Show this help.
  --version   Show the version.

Control shell commands (-i, -c): help, ?, assign, create, disable, enable,
group, hash, health, rr, kill, maxc, metrics, monitor, mrtg-bytes, mrtg-conns,
quit, reset, show, version.  State lives in /var/run/balance (or $BALANCE_STATE_DIR).
The command "metrics FILE" replaces FILE atomically (node_exporter textfiles).
"""

KNOWN_SHORTS = set("6aAbBcdfgHikKlLmMpPrthw")


def short_usage() -> str:
    """The usage lines alone, for error messages."""
    return USAGE.split("\n\n", 1)[0]


TAKES_ARG = set("AbBcgtTkKlLmPw")


def _explain(argv: list[str]) -> str:
    """Say what docopt rejected: an unknown option, a missing option
    argument, or (when neither) the command line as a whole."""
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        if word.startswith("--"):
            if word not in ("--help", "--version"):
                return f"unknown option {word}"
            continue
        if not word.startswith("-") or len(word) == 1:
            continue
        for i, ch in enumerate(word[1:]):
            if ch not in KNOWN_SHORTS:
                return f"unknown option -{ch}"
            if ch in TAKES_ARG:
                if i == len(word) - 2 and next(words, None) is None:
                    return f"option -{ch} requires an argument"
                break
    return "invalid command line"


def parse(argv: list[str]) -> ProxyConfig | ShellConfig:
    """Turn argv (without the program name) into a config, or raise BalanceError."""
    try:
        args = docopt(USAGE, argv=argv, help=False, version=None)
    except DocoptExit:
        raise BalanceError(f"{_explain(argv)}\n{short_usage()}", EX_USAGE)
    port = parse_port(args["<port>"]) if args["<port>"] is not None else 0
    bind = args["-b"]
    if args["-i"] or args["-c"] is not None:
        return ShellConfig(port=port, bind=bind, command=args["-c"], debug=args["-d"])
    cfg = ProxyConfig(
        port=port,
        bind=bind,
        source=args["-B"],
        connect_timeout=parse_seconds(args["-t"] or str(DEFAULT_CONNECT_TIMEOUT), "-t"),
        idle_timeout=parse_seconds(args["-T"] or "0", "-T"),
        autodisable=args["-a"],
        debug=args["-d"],
        foreground=args["-f"],
        packet_dump=args["-p"],
        hash_failover=args["-H"],
        ipv6=args["-6"],
        client_keepalive=parse_keepalive(args["-k"], "-k") if args["-k"] else None,
        server_keepalive=parse_keepalive(args["-K"], "-K") if args["-K"] else None,
        monitor=parse_monitor(args["-m"]) if args["-m"] is not None else None,
        grace=parse_seconds(args["-g"], "-g") if args["-g"] is not None else DEFAULT_GRACE,
        replace=args["-r"],
        proxy_protocol=parse_version(args["-P"]) if args["-P"] is not None else None,
        frontdoor=parse_frontdoor(args["-A"]) if args["-A"] is not None else None,
        workers=parse_workers(args["-w"] or "1", MAXWORKERS),
        max_conns=parse_limit(args["-L"], "-L") if args["-L"] is not None else None,
        per_source=parse_limit(args["-l"] or "0", "-l"),
    )
    cfg.groups = parse_groups(args["<channel>"], port)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``balance`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    if "--version" in argv:
        sys.stdout.write(f"balance {__version__} (gbalance)\n")
        return 0
    try:
        cfg = parse(argv)
        if isinstance(cfg, ShellConfig):
            from gbalance.shell.shell import run_shell
            return run_shell(cfg)
        from gbalance.process.master import run_master
        return run_master(cfg)
    except BalanceError as exc:
        write_stderr(LOG_ERR, exc.message)   # with its priority under systemd
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so in one line, never a traceback
        sys.stderr.write(f"balance: internal error: {type(exc).__name__}: {exc}\n")
        return EX_SOFTWARE
