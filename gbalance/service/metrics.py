"""``balance-instances metrics DIR``: node_exporter textfile collector files.

One file per running instance, in the format of ``balance -c metrics``
(:func:`gbalance.shell.render.metrics_text`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from syslog import LOG_WARNING

from gbalance.service.conffile import Config, Out, load
from gbalance.service.masters import find_master
from gbalance.shell.render import metrics_text, open_metrics_dir, write_metrics_at
from gbalance.table.files import StateError, state_dir
from gbalance.table.state import SharedState


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
