"""``balance-instances health``: are the proxies of /etc/balance.conf up and accepting?

Made for keepalived's ``vrrp_script`` (and any other health checker): exit
0 only when every instance of the config file has a live master that
listens on its port and keeps up with its accept queue; otherwise one line
per failing instance on stderr and exit 1 (78 when the file cannot be
read; a file without instances fails too, there is nothing to serve).

No side effects: nothing connects to the proxy (a probe connection would be
forwarded to a backend and counted), no state file or lock is written, no
process signalled.  Everything is read from the kernel:

* the master: the pid in the instance's state file, alive (the master
  lock, or pid plus start time) and not stopped (``T`` in /proc/PID/stat:
  a stopped master accepts nothing);
* its listener: a TCP socket in LISTEN state on the instance's port, in
  this network namespace, that the master itself holds open (its inode
  among /proc/PID/fd);
* accepting: that socket's accept queue is not full (more connections
  waiting for accept than its backlog): a master that hangs lets it fill.

The listening sockets come from the kernel's sock_diag netlink interface,
asked for LISTEN sockets only, so a host with 100,000 connections in
TIME_WAIT answers as fast as an idle one (reading /proc/net/tcp, the
fallback, took 0.45 s with 50,000 of them).  The whole check takes a few
milliseconds after the interpreter has started.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from dataclasses import dataclass

from gbalance.system.limits import LISTEN_BACKLOG
from gbalance.service.conffile import Out, load
from gbalance.table.files import StateError, state_dir
from gbalance.table.liveness import process_start_ticks
from gbalance.table.state import SharedState

TCP_LISTEN = "0A"
PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")

# sock_diag (linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI48s")            # family, protocol, ext, pad, states, sockid
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg: 72 bytes
_STATE_LISTEN = 10
#: Most bytes read from the kernel for one family (a bound for a hostile or huge answer).
_MAX_ANSWER = 16 << 20


@dataclass(frozen=True)
class Listener:
    """One LISTEN socket from /proc/net/tcp[6]."""

    port: int
    inode: int
    queued: int       # connections waiting for accept
    backlog: int      # the most that may wait (the kernel's queue is full above it)


def listeners() -> list[Listener]:
    """Every TCP socket in LISTEN state in this network namespace (netlink, else /proc)."""
    try:
        return diag_listeners(socket.AF_INET) + diag_listeners(socket.AF_INET6)
    except OSError:
        return proc_listeners()


def diag_listeners(family: int, timeout: float = 2.0) -> list[Listener]:
    """LISTEN TCP sockets of ``family`` from sock_diag; OSError when it cannot tell."""
    found: list[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout)
        request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _STATE_LISTEN, bytes(48))
        nl.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request, (0, 0))
        total = 0
        while True:
            data = nl.recv(65536)
            total += len(data)
            if not data or total > _MAX_ANSWER:
                raise OSError("sock_diag: truncated answer")
            at = 0
            while at + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, at)
                if length < _NLMSGHDR.size or at + length > len(data):
                    raise OSError("sock_diag: malformed answer")
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise OSError("sock_diag: request refused")
                if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MSG.size:
                    fields = _MSG.unpack_from(data, at + _NLMSGHDR.size)
                    if fields[1] == _STATE_LISTEN:
                        port = int.from_bytes(fields[4], "big")
                        found.append(Listener(port, fields[14], fields[11], fields[12]))
                at += (length + 3) & ~3


def proc_listeners(paths: tuple[str, ...] = PROC_NET, backlog: int | None = None) -> list[Listener]:
    """Every LISTEN TCP socket from /proc/net/tcp[6] (which do not show the backlog)."""
    backlog = accept_limit() if backlog is None else backlog
    found = []
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            try:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                queued = int(fields[4].split(":", 1)[1], 16)   # tx_queue:rx_queue
                inode = int(fields[9])
            except (ValueError, IndexError):
                continue
            found.append(Listener(port, inode, queued, backlog))
    return found


def accept_limit(path: str = "/proc/sys/net/core/somaxconn") -> int:
    """A master's listen backlog (what it asks for, ``LISTEN_BACKLOG``, cut to net.core.somaxconn)."""
    try:
        with open(path, encoding="ascii") as f:
            system = int(f.read().strip() or 0)
    except (OSError, ValueError):
        system = 0
    return min(LISTEN_BACKLOG, system) if system > 0 else min(LISTEN_BACKLOG, socket.SOMAXCONN)


def socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets ``pid`` holds open; None when /proc does not tell us."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            try:
                inodes.add(int(target[8:-1]))
            except ValueError:
                pass
    return inodes


def stopped(pid: int) -> bool:
    """True if ``pid`` is stopped (SIGSTOP, a debugger): it accepts nothing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"T", b"t")


def master_of(key: str) -> tuple[int, str]:
    """(pid, "") of the live master of instance ``key``, or (0, why not)."""
    path = os.path.join(state_dir(), "balance." + key)
    try:
        st = SharedState.attach(path)
    except FileNotFoundError:
        return 0, "not running (no state file)"
    except StateError as exc:
        if exc.errno == errno.ENOENT:
            return 0, "not running (no state file)"
        return 0, f"state file unusable: {exc}"
    try:
        pid = st.pid
        if not st.master_alive() or process_start_ticks(pid) is None:
            return 0, "not running"
        return pid, ""
    finally:
        st.close()


def check(key: str, port: int, socks: list[Listener]) -> str:
    """"" if instance ``key`` on ``port`` is up and accepting, else why not."""
    pid, why = master_of(key)
    if not pid:
        return why
    if stopped(pid):
        return f"master (pid {pid}) is stopped"
    mine = [s for s in socks if s.port == port]
    if not mine:
        return f"master (pid {pid}) runs but nothing listens on port {port}"
    held = socket_inodes(pid)
    if held is not None:
        mine = [s for s in mine if s.inode in held]
        if not mine:
            return f"master (pid {pid}) does not hold a listening socket on port {port}"
    if all(s.queued > s.backlog for s in mine):
        return f"master (pid {pid}) is not accepting: accept queue full ({mine[0].queued})"
    return ""


def run(out) -> int:
    """The ``health`` action of balance-instances: 0 healthy, 1 not, 78 unreadable config."""
    cfg = load(out)
    if not cfg.instances:
        out.problem(f"balance: no instances configured in {cfg.path}")
        return 1
    socks = listeners()
    bad = 0
    for inst in cfg.instances:
        why = check(inst.key, inst.port, socks)
        if why:
            bad += 1
            out.problem(f"balance {inst.key}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":   # pragma: no cover - run through balance-instances
    sys.exit(run(Out()))
