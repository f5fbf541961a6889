"""What the control shell prints: tables, MRTG lines, help, version and metrics.

Pure functions of a mapped state file (read without locks: a value may be
one connection old, never torn across a slot).  Text from the file is shown
through :func:`printable`: only printable ASCII reaches a terminal.
:func:`write_atomic` puts a rendering into a file for collectors that read
files (node_exporter's textfile collector): written to a temporary file in
the same directory and renamed over the target, so a reader never sees half
a file; every step is relative to a pinned descriptor of the directory
(refused when others may write to it), and only a metrics file this program
wrote is ever replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable

from gbalance import __version__
from gbalance.table.layout import (C_CHANGED, C_FAILS, C_PASSES, C_STAGGERED, C_STAGGER_US, Channel,
                                   ENABLED, HARD_DISABLED, HASH, H_STAGGER_US, MAXCHANNELS, MAXGROUPS,
                                   MON_DISABLED, MON_ENABLED, MON_NONE, RR, SOFT_DISABLED, STATUS_NAMES,
                                   TYPE_NAMES)
from gbalance.table.state import SharedState

SHOW_HEADER = "GRP Type  #   S {addr}  port    c      totalc maxc        sent        rcvd"
SHOW_ROW = ("{g:3d} {t:>4s} {c:2d} {s:>3s} {addr} {port:5d} {cur:4d} {totalc:11d} {maxc:4d}"
            " {sent:11d} {rcvd:11d}")
ADDR_WIDTH = 16
#: Width of the command column in ``help`` (balance.fm's ``monitor`` line fits it exactly).
HELP_WIDTH = 29


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on (escapes, controls,
    non-ASCII) shown as ``?``: a state file's owner chooses what its fields hold."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def address_width(channels: Iterable[Channel]) -> int:
    return max([ADDR_WIDTH] + [len(printable(ch.address)) for ch in channels])


def show_text(state: SharedState) -> str:
    """The ``show`` table: balance's exact layout, wider only for long IPv6 addresses."""
    channels = list(state.channels())
    width = address_width(channels)
    lines = [SHOW_HEADER.format(addr="ip-address".rjust(width))]
    for ch in channels:
        lines.append(SHOW_ROW.format(
            g=ch.group, t=TYPE_NAMES.get(state.group_type(ch.group), "?"), c=ch.index,
            s=STATUS_NAMES.get(ch.status, "???"), addr=printable(ch.address).rjust(width), port=ch.port,
            cur=ch.c, totalc=ch.totalc, maxc=ch.maxc, sent=ch.sent, rcvd=ch.rcvd))
    return "\n".join(lines) + "\n"


def monitor_status_line(state: SharedState) -> str:
    """balance.fm's answer to ``monitor show`` (the checks run inside the master)."""
    word = "enabled" if state.monitor == MON_ENABLED else "disabled"
    return f"monitor process running as pid {state.pid} and is {word}"


def monitor_table(state: SharedState) -> str:
    """Each channel as monitoring sees it (gbalance's extra lines after balance.fm's)."""
    channels = list(state.channels())
    width = address_width(channels)
    lines = [f"GRP  #   S {'ip-address'.rjust(width)}  port suspect fails passes stagger"
             " staggered since"]
    now = int(time.time())
    for ch in channels:
        changed = state.get(ch.group, ch.index, C_CHANGED)
        since = f"{max(0, now - changed)}s" if changed else "-"
        delay = stagger_seconds(state, ch.group, ch.index)
        lines.append(f"{ch.group:3d} {ch.index:2d} {STATUS_NAMES.get(ch.status, '???'):>3s} "
                     f"{printable(ch.address).rjust(width)} {ch.port:5d} "
                     f"{'yes' if ch.suspect else 'no':>7s} "
                     f"{state.get(ch.group, ch.index, C_FAILS):5d} "
                     f"{state.get(ch.group, ch.index, C_PASSES):6d} "
                     f"{delay * 1000:5.1f}ms "
                     f"{state.counter(ch.group, ch.index, C_STAGGERED):9d} {since}")
    return "\n".join(lines) + "\n"


def stagger_seconds(state: SharedState, g: int, c: int) -> float:
    """A channel's adaptive stagger delay now: its own once it has one, else
    the delay of an unmeasured channel (0 when staggering is off)."""
    own = state.get(g, c, C_STAGGER_US)
    return (own if own > 0 else state.q[H_STAGGER_US]) / 1e6


def mrtg_bytes(ch: Channel) -> str:
    return f"{ch.rcvd}\n{ch.sent}\nUNKNOWN\ngroup {ch.group} channel {ch.index}\n"


def mrtg_conns(ch: Channel) -> str:
    return f"{ch.totalc}\nUNKNOWN\nUNKNOWN\ngroup {ch.group} channel {ch.index}\n"


def version_text() -> str:
    return (f"  This is balance {__version__} (gbalance)\n"
            f"  MAXGROUPS={MAXGROUPS}\n  MAXCHANNELS={MAXCHANNELS}\n")


def help_text(entries: Iterable[tuple[str, str]]) -> str:
    """``available commands:`` and one line per (usage, summary)."""
    lines = ["available commands:"]
    for usage, summary in entries:
        lines.append(f"  {usage:<{HELP_WIDTH}s}  {summary}")
    return "\n".join(lines) + "\n"


def banner(state: SharedState) -> str:
    return (f"\nbalance {__version__} (gbalance) interactive command shell\n"
            f"PID of master process is {state.pid}\n\n")


# -- Prometheus ------------------------------------------------------------------

CHANNEL_METRICS = [
    # name, type, help, channel attribute
    ("balance_channel_connections", "gauge", "Open client connections of a channel.", "c"),
    ("balance_channel_connections_total", "counter",
     "Connection attempts handed to a channel (zeroed by reset).", "totalc"),
    ("balance_channel_maxc", "gauge", "Connection limit of a channel (0 = no limit).", "maxc"),
    ("balance_channel_sent_bytes_total", "counter",
     "Bytes forwarded from clients to the channel's server (zeroed by reset).", "sent"),
    ("balance_channel_received_bytes_total", "counter",
     "Bytes forwarded from the channel's server to clients (zeroed by reset).", "rcvd"),
    ("balance_channel_suspect", "gauge",
     "1 while a connect to the channel has been pending too long (monitoring).", "suspect"),
]
STATE_LABELS = {ENABLED: "enabled", SOFT_DISABLED: "soft_disabled", HARD_DISABLED: "hard_disabled"}
MONITOR_LABELS = {MON_NONE: "none", MON_ENABLED: "enabled", MON_DISABLED: "disabled"}


def label(value: object) -> str:
    """Escape a label value as the text exposition format requires."""
    return printable(str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))


def metrics_text(state: SharedState, port: int, bind: str | None) -> str:
    """Every counter and state in the Prometheus text exposition format (0.0.4).

    Every series carries the instance's listening ``port`` and ``bind``
    address (``any`` without ``-b``), so the files of many instances can be
    collected side by side; nothing in a label changes when the master
    restarts (``balance_start_time_seconds`` tells restarts apart).
    """
    out: list[str] = []
    inst = f'port="{port}",bind="{label(bind or "any")}"'

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    family("balance_up", "gauge", "1 while the master process of this instance runs.")
    out.append(f"balance_up{{{inst}}} {1 if state.master_alive() else 0}")
    family("balance_start_time_seconds", "gauge", "Unix time the master process started.")
    out.append(f"balance_start_time_seconds{{{inst}}} {state.started}")
    family("balance_monitoring", "gauge", "Monitoring (-m) state: 1 for the current one.")
    for switch, name in MONITOR_LABELS.items():
        out.append(f'balance_monitoring{{{inst},state="{name}"}} {1 if state.monitor == switch else 0}')
    family("balance_group_type", "gauge", "Routing of a group: 1 for its current type (rr or hash).")
    for g in range(min(state.ngroups, MAXGROUPS)):
        kind = state.group_type(g)
        for routing, name in ((RR, "rr"), (HASH, "hash")):
            out.append(f'balance_group_type{{{inst},group="{g}",type="{name}"}} '
                       f"{1 if kind == routing else 0}")
    channels = list(state.channels())
    labels = {(ch.group, ch.index): (f'{inst},group="{ch.group}",channel="{ch.index}",'
                                     f'address="{label(ch.address)}",channel_port="{ch.port}"')
              for ch in channels}
    family("balance_channel_state", "gauge",
           "Channel state: 1 for the current one (enabled, soft_disabled, hard_disabled).")
    for ch in channels:
        for value, name in STATE_LABELS.items():
            out.append(f'balance_channel_state{{{labels[ch.group, ch.index]},state="{name}"}} '
                       f"{1 if ch.status == value else 0}")
    for metric, mtype, text, attr in CHANNEL_METRICS:
        family(metric, mtype, text)
        for ch in channels:
            out.append(f"{metric}{{{labels[ch.group, ch.index]}}} {int(getattr(ch, attr))}")
    family("balance_channel_stagger_seconds", "gauge",
           "Adaptive stagger delay: how long a connect to the channel may pend before a"
           " parallel one starts (monitoring; 0 = off).")
    for ch in channels:
        out.append(f"balance_channel_stagger_seconds{{{labels[ch.group, ch.index]}}} "
                   f"{stagger_seconds(state, ch.group, ch.index):.6f}")
    family("balance_channel_staggered_total", "counter",
           "Parallel connects started because a connect to the channel hung past its delay.")
    for ch in channels:
        out.append(f"balance_channel_staggered_total{{{labels[ch.group, ch.index]}}} "
                   f"{state.counter(ch.group, ch.index, C_STAGGERED)}")
    return "\n".join(out) + "\n"


#: How a metrics file this program wrote begins (the first family's HELP line).
METRICS_SIGNATURE = b"# HELP balance_up "


def open_metrics_dir(directory: str) -> int:
    """Open (and pin) a directory for metrics files; its descriptor.

    Refused (``OSError``) when it is no directory or group or others may
    write to it: they could put a name of their choosing where root writes.
    """
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o022:
            raise OSError(errno.EPERM, f"refusing directory {printable(directory)}: other users may write to it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_metrics_at(dir_fd: int, name: str, text: str) -> None:
    """Replace file ``name`` in the pinned directory ``dir_fd`` with ``text`` at once.

    Every step is relative to ``dir_fd`` and never follows a symbolic link:
    a temporary file of our own (``O_EXCL``), fsync, rename over ``name``.
    What sits at ``name`` is replaced only if this program wrote it: a
    regular file of ours, with one name, beginning as a metrics file does.
    Raises ``OSError``; a failed write leaves the old file as it was.
    """
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"not a file name: {printable(name)}")
    _check_replaceable(dir_fd, name)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _check_replaceable(dir_fd: int, name: str) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    why = None
    if not stat.S_ISREG(info.st_mode):
        why = "not a regular file"
    elif info.st_uid != os.geteuid() or info.st_nlink != 1:
        why = "not a metrics file balance wrote"
    else:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                head = os.read(fd, len(METRICS_SIGNATURE))
            finally:
                os.close(fd)
        except OSError:
            head = b""
        if head != METRICS_SIGNATURE:
            why = "not a metrics file balance wrote"
    if why:
        raise OSError(errno.EEXIST, f"refusing to replace {printable(name)}: {why}")


def write_atomic(path: str, text: str) -> None:
    """Replace the metrics file ``path`` with ``text`` at once (mode 0644); see
    :func:`write_metrics_at`.  Raises ``OSError``."""
    dir_fd = open_metrics_dir(os.path.dirname(path) or ".")
    try:
        write_metrics_at(dir_fd, os.path.basename(path), text)
    finally:
        os.close(dir_fd)
