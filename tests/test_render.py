"""gbalance.shell.render: the shell's output formats, from a real state file."""

from __future__ import annotations

import os

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.table.channels import Channels
from gbalance.shell.render import help_text, metrics_text, show_text, write_atomic

from test_shell import parse_metrics, row, table


@pytest.fixture
def st(tmp_path):
    state = S.SharedState.create(str(tmp_path / "balance.8080.any"))
    ch = Channels(state)
    ch.add_group()
    ch.add_channel(0, "127.0.0.1", 8001, 4)
    ch.add_group(L.HASH)
    ch.add_channel(1, "2001:db8:1234:5678:9abc:def0:1234:5678", 443)
    yield state
    state.close()


def test_show_uses_balance_c_format(st):
    st.put(0, 0, L.C_TOTALC, 12)
    st.put(0, 0, L.C_SENT, 2**40)
    st.set_status(1, 0, L.SOFT_DISABLED)
    w = len("2001:db8:1234:5678:9abc:def0:1234:5678")
    assert show_text(st) == table(row(0, "RR", 0, "ENA", "127.0.0.1", 8001, 0, 12, 4, 2**40, 0, width=w),
                                  row(1, "Hash", 0, "dis", "2001:db8:1234:5678:9abc:def0:1234:5678", 443,
                                      width=w), width=w)


def test_metrics_every_series_names_the_instance(st):
    text = metrics_text(st, 8080, "::1")
    m = parse_metrics(text)
    assert m and all(dict(k[1])["port"] == "8080" and dict(k[1])["bind"] == "::1" for k in m)
    assert m[("balance_start_time_seconds", (("bind", "::1"), ("port", "8080")))] == st.started
    assert "pid" not in text
    assert 'address="2001:db8:1234:5678:9abc:def0:1234:5678",channel_port="443"' in text
    assert parse_metrics(metrics_text(st, 8080, None))[
        ("balance_up", (("bind", "any"), ("port", "8080")))] == 1


def test_help_columns():
    assert help_text([("monitor [enable|disable|show]", "control the monitor process"), ("rr", "x")]) == \
        "available commands:\n  monitor [enable|disable|show]  control the monitor process\n" \
        "  rr                             x\n"


def test_write_atomic_replaces_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "x.prom"
    target.write_text("# HELP balance_up old\n")
    write_atomic(str(target), "# HELP balance_up new\n")
    assert target.read_text() == "# HELP balance_up new\n" and target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["x.prom"]
    busy = tmp_path / "busy.prom"            # rename onto a non-empty directory fails
    busy.mkdir()
    (busy / "kept").write_text("kept\n")
    with pytest.raises(OSError):
        write_atomic(str(busy), "lost\n")
    assert (busy / "kept").read_text() == "kept\n"
    assert sorted(os.listdir(tmp_path)) == ["busy.prom", "x.prom"]      # no temporary left
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "missing" / "x.prom"), "lost\n")


def test_metrics_never_replace_what_balance_did_not_write(tmp_path):
    """Only a regular file of ours that begins as a metrics file is replaced."""
    from gbalance.shell.render import write_atomic
    text = "# HELP balance_up x\n"
    precious = tmp_path / "passwd"
    precious.write_text("root:x:0:0\n")
    with pytest.raises(OSError, match="not a metrics file balance wrote"):
        write_atomic(str(precious), text)
    assert precious.read_text() == "root:x:0:0\n"
    fifo = tmp_path / "fifo.prom"
    os.mkfifo(fifo)
    link = tmp_path / "link.prom"
    link.symlink_to(precious)
    for target in (fifo, link):
        with pytest.raises(OSError, match="not a regular file"):
            write_atomic(str(target), text)
    assert precious.read_text() == "root:x:0:0\n" and link.is_symlink()
    hard = tmp_path / "hard.prom"
    (tmp_path / "first.prom").write_text(text)
    os.link(tmp_path / "first.prom", hard)
    with pytest.raises(OSError, match="not a metrics file balance wrote"):
        write_atomic(str(hard), text)
    assert sorted(os.listdir(tmp_path)) == ["fifo.prom", "first.prom", "hard.prom", "link.prom", "passwd"]


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_metrics_refuse_a_directory_others_may_write(tmp_path, mode):
    from gbalance.shell.render import write_atomic
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(OSError, match="other users may write to it"):
        write_atomic(str(d / "x.prom"), "# HELP balance_up x\n")
    assert os.listdir(d) == []
