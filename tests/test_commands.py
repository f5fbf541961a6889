"""The shell's commands in process (as test_routing.py does for routing).

A real state file, the master's mailbox polled by a thread, and a
:class:`~gbalance.shell.commands.Session` writing into a string: every command's
exact answer and its effect on the table.  ``test_shell.py`` runs the same
commands through the CLI against real masters.
"""

from __future__ import annotations

import io
import os

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.shell.commands import COMMANDS, DENIED, Quit, Session, lookup
from gbalance.config import ShellConfig

from test_mailbox import Poller, new_table


@pytest.fixture
def st(tmp_path):
    state = new_table(tmp_path, 8001, 8002)
    yield state
    state.close()


@pytest.fixture
def sh(st):
    p = Poller(st)
    shell = Session(st, ShellConfig(port=8080), io.StringIO())
    yield shell
    p.close()


def run(shell: Session, line: str) -> str:
    shell.out.seek(0)
    shell.out.truncate()
    shell.execute(line)
    return shell.out.getvalue()


@pytest.mark.parametrize("line, answer", [
    ("frobnicate", "syntax error\n"),
    ("disable", "syntax error\n"),
    ("disable 7", "no such channel 7\n"),
    ("enable -1", "no such channel -1\n"),
    ("reset 7", "no such channel 7\n"),
    ("assign 7 127.0.0.1 80", "unknown channel\n"),
    ("maxc 7 1", "unknown channel\n"),
    ("maxc 0 -1", "value out of range\n"),
    ("group 32", "value out of range\n"),
    ("group -1", "value out of range\n"),
    ("group x", "syntax error\n"),
    ("mrtg-bytes 1 0", "unknown group\n"),
    ("mrtg-conns 0 2", "unknown channel\n"),
    ("assign 0 127.0.0.1 80", "channel must be disabled to assign new address\n"),
    ("create 127.0.0.1 0", "value out of range\n"),
    ("create no-such-host.invalid 80", "invalid address\n"),
    ("monitor", "no monitor process running\n"),
    ("monitor show", "no monitor process running\n"),
    ("health", "no monitor process running\n"),
    ("group 0", ""),
    ("group 1", "unknown group\n"),
    ("group 31", "unknown group\n"),
    ("metrics a b", "syntax error\n"),
    ("", ""),
])
def test_messages(sh, st, line, answer):
    assert run(sh, line) == answer
    assert [c.status for c in st.channels()] == [L.ENABLED, L.ENABLED]


def test_enable_disable(sh, st):
    assert run(sh, "disable 1") == "channel 1 disabled\n"
    assert run(sh, "disable 1") == "channel 1 already disabled\n"
    assert st.channel(0, 1).status == L.HARD_DISABLED
    assert run(sh, "enable 1") == "channel 1 enabled\n"
    assert run(sh, "e 1") == "channel 1 already enabled\n"


def test_assign_only_on_hard_disabled(sh, st):
    st.set_status(0, 0, L.SOFT_DISABLED)
    assert run(sh, "assign 0 ::1 9") == "channel must be disabled to assign new address\n"
    run(sh, "disable 0")
    assert run(sh, "assign 0 [::1] 9") == "channel reassigned\n"
    assert (st.address(0, 0), st.get(0, 0, L.C_PORT)) == ("::1", 9)


def test_create_group_hash_rr(sh, st):
    assert run(sh, "group 2") == "unknown group\n"       # no channels yet, still selected
    assert sh.group == 2
    assert run(sh, "create 10.0.0.1 80") == "channel created\n"
    assert st.ngroups == 3 and st.channel(2, 0).status == L.HARD_DISABLED
    assert run(sh, "hash") == "group 2 set to hash\n" and st.group_type(2) == L.HASH
    assert run(sh, "rr") == "group 2 set to round robin\n" and st.group_type(2) == L.RR
    for _ in range(L.MAXCHANNELS - 1):
        run(sh, "create 10.0.0.1 80")
    assert run(sh, "create 10.0.0.1 80") == "no channel slots available\n"


def test_maxc_reset_mrtg(sh, st):
    assert run(sh, "maxc 1 5") == "maxc of channel 1 changed to 5\n"
    for field, value in ((L.C_TOTALC, 3), (L.C_SENT, 10), (L.C_RCVD, 20)):
        st.put(0, 0, field, value)
    assert run(sh, "mrtg-bytes 0 0") == "20\n10\nUNKNOWN\ngroup 0 channel 0\n"
    assert run(sh, "mrtg-conns 0 0") == "3\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n"
    assert run(sh, "reset 0") == "channel 0 counters reset\n"
    assert run(sh, "mrtg-conns 0 0") == "0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n"
    assert run(sh, "mrtg-bytes 0 0") == "0\n0\nUNKNOWN\ngroup 0 channel 0\n"


def test_monitor_commands(sh, st):
    st.set_monitor(L.MON_ENABLED)
    pid = os.getpid()
    assert run(sh, "monitor show") == f"monitor process running as pid {pid} and is enabled\n"
    assert run(sh, "monitor disable") == "monitor is now disabled\n"
    assert run(sh, "monitor disable") == "monitor is already disabled\n"
    assert run(sh, "monitor show") == f"monitor process running as pid {pid} and is disabled\n"
    table = run(sh, "health").splitlines()
    assert table[0] == f"monitor process running as pid {pid} and is disabled"
    assert table[1].split()[:6] == ["GRP", "#", "S", "ip-address", "port", "suspect"]
    assert len(table) == 4
    assert run(sh, "monitor enable") == "monitor is now enabled\n"
    assert run(sh, "monitor enable") == "monitor is already enabled\n"
    assert run(sh, "monitor") == "syntax error\n"
    assert run(sh, "monitor up") == "syntax error\n"


def test_help_version_and_abbreviations(sh):
    text = run(sh, "help")
    assert text.startswith("available commands:\n")
    assert "  monitor [enable|disable|show]  control the monitor process\n" in text
    assert run(sh, "?") == text and run(sh, "h") == text
    assert lookup("ha").name == "hash" and lookup("r").name == "reset" and lookup("zz") is None
    assert [c.name for c in COMMANDS if c.summary][0] == "help"
    assert run(sh, "v") == "  This is balance 1.0.0 (gbalance)\n  MAXGROUPS=32\n  MAXCHANNELS=64\n"
    with pytest.raises(Quit) as info:
        run(sh, "q")
    assert info.value.code == 0


def test_read_only_session_is_denied_changes(st):
    fd = os.open(st.path, os.O_RDONLY)
    ro = S.SharedState(st.path, fd, False)
    try:
        shell = Session(ro, ShellConfig(port=8080), io.StringIO())
        for line in ("disable 0", "reset 0", "create 127.0.0.1 1", "hash", "maxc 0 1", "kill"):
            assert run(shell, line) == DENIED + "\n", line
        assert run(shell, "mrtg-conns 0 1") == "0\nUNKNOWN\nUNKNOWN\ngroup 0 channel 1\n"
        st.set_monitor(L.MON_ENABLED)                    # reading commands work read-only
        assert run(shell, "health").splitlines()[0].endswith("and is enabled")
        assert run(shell, "monitor show").endswith("and is enabled\n")
    finally:
        ro.close()


def test_metrics_to_a_file(sh, st, tmp_path):
    target = tmp_path / "m.prom"
    assert run(sh, f"metrics {target}") == ""
    assert target.read_text().startswith("# HELP balance_up ")
    assert sh.status == 0
    sh.execute(f"metrics {tmp_path}/nowhere/m.prom")
    assert sh.status == 73


def test_a_terminal_session_adds_hints_after_balances_text(sh, st):
    """``friendly`` (-i on a terminal): balance's line first, then a hint or table."""
    sh.friendly = True
    assert run(sh, "frobnicate") == "syntax error\n(unknown command frobnicate: type help for a list)\n"
    assert run(sh, "monitor") == "no monitor process running\n(start the master with -m to use monitoring)\n"
    assert run(sh, "group 3") == "unknown group\n(group 3 has no channels; create adds one to it)\n"
    st.set_monitor(L.MON_ENABLED)
    text = run(sh, "monitor show").splitlines()
    assert text[0] == f"monitor process running as pid {os.getpid()} and is enabled"
    assert text[1].split()[:2] == ["GRP", "#"] and len(text) == 4


def test_new_commands_keep_balances_abbreviations():
    """gbalance's own commands come after balance's in lookup order, so every
    prefix a balance script may use still means the same command."""
    balance_commands = ["help", "assign", "create", "disable", "enable", "group", "hash", "kill",
                        "maxc", "monitor", "mrtg-bytes", "mrtg-conns", "quit", "reset", "rr",
                        "show", "version"]
    for name in balance_commands:
        for end in range(1, len(name) + 1):
            first = next(n for n in balance_commands if n.startswith(name[:end]))
            assert lookup(name[:end]).name == first, name[:end]
    assert lookup("hea").name == "health" and lookup("me").name == "metrics"
