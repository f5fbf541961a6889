"""Process limits a proxy needs: enough file descriptors for its connections.

One process holds every proxied connection: two sockets each, plus two
pipe descriptors per direction while it splices.  The usual soft limit of
1024 open files would stop it at about 500 connections, so the master
raises its soft limit to the hard limit at start (a process may always do
that) and logs what it got.  The commands it runs get the limit it started
with back (:func:`restore_start_limit`).
"""


import resource

from gbalance.system.records import RESERVED_FDS, ConnLimit, FdLimit


#: The listen backlog a master asks for.  The kernel cuts it to
#: net.core.somaxconn, so an administrator who raises that sysctl for
#: connect storms gets the larger accept queue without a new release
#: (``socket.SOMAXCONN``, 4096, would cap it whatever the sysctl says).
LISTEN_BACKLOG = 65535

#: The soft limit this process started with (set by the first :func:`raise_fd_limit`).
_start_soft: int | None = None


def raise_fd_limit() -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as the kernel allows.

    An unlimited hard limit cannot be a soft limit for descriptors: then
    ``/proc/sys/fs/nr_open`` (the most one process may have) is used.
    """
    global _start_soft
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _start_soft is None:
        _start_soft = soft
    want = hard
    if want == resource.RLIM_INFINITY:
        want = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdLimit(before=soft, after=after, hard=hard)


def restore_start_limit() -> None:
    """Give this process the soft descriptor limit it started with, if it was raised.

    For a child (a monitoring check) between fork and exec: commands get
    the limit a shell would give them, not the master's raised one.
    """
    if _start_soft is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != _start_soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_start_soft, hard))
        except (ValueError, OSError):
            pass


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_and_report(log, quiet: bool = False) -> FdLimit:
    """Raise the descriptor limit and log one info line about it (unless ``quiet``)."""
    limit = raise_fd_limit()
    if not quiet:
        log.info(limit.describe())
    return limit


#: Without -L, this share of the descriptors is kept for splice pipes
#: (2 descriptors each); connections take the rest, 2 descriptors each.
PIPE_SHARE = 32
#: No pipe or connection limit.
UNLIMITED = 1 << 62


def current_nofile() -> int:
    """This process's soft RLIMIT_NOFILE (an unlimited one as nr_open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _nr_open() if soft == resource.RLIM_INFINITY else soft


def connection_limit(requested: int | None, workers: int = 1, nofile: int | None = None,
                     reserve: int = 0) -> ConnLimit:
    """The limits of one serving process.

    ``requested``: -L (None: derived from the descriptor limit, so that
    connections and splice pipes together stay below it; 0: no limit).  An
    explicit -L counts for the whole instance and is split over the
    ``workers`` (each gets its share, rounded up); the derived default is per
    process, since each has its own descriptor table.  ``reserve``: more
    descriptors to keep aside (health checks).
    """
    if nofile is None:
        nofile = current_nofile()
    kept = min(RESERVED_FDS + reserve, nofile // 4)
    usable = max(0, nofile - kept)
    if requested == 0:
        return ConnLimit(0, UNLIMITED, nofile)
    if requested is None:
        pipes = nofile // PIPE_SHARE
        return ConnLimit(max(1, (usable - 2 * pipes) // 2), pipes, nofile)
    conns = -(-requested // max(1, workers))
    return ConnLimit(conns, max(0, (usable - 2 * conns) // 2), nofile, overcommitted=2 * conns > usable)
