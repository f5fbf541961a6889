"""The ``-m`` specification: balance.fm's grammar plus rise, fall and stagger."""

from __future__ import annotations

import pytest
from conftest import free_port

from gbalance.errors import EX_UNAVAILABLE, BalanceError
from gbalance.monitor.monspec import DEFAULT_INTERVAL, DEFAULT_STAGGER, parse_monitor, split_pairs


def test_connect_alone_gets_balance_fm_defaults():
    spec = parse_monitor("connect")
    assert [c.kind for c in spec.checks] == ["connect"]
    assert spec.checks[0].timeout is None          # means: the -t value
    assert spec.interval == DEFAULT_INTERVAL == 60.0
    assert (spec.enable, spec.disable, spec.rise, spec.fall) == (True, True, 1, 1)
    assert spec.stagger == DEFAULT_STAGGER == 0.25


def test_manpage_example_chain():
    spec = parse_monitor(r"connect:timeout=0.4:command=/bin/checksvc -s %H -p %P >/dev/null:pass=0,2:interval=10")
    connect, command = spec.checks
    assert connect.kind == "connect" and connect.timeout == 0.4
    assert command.kind == "command"
    assert command.command == "/bin/checksvc -s %H -p %P >/dev/null"
    assert command.passes == (0, 2)
    assert spec.interval == 10.0


def test_escaped_colon_stays_in_the_command():
    spec = parse_monitor(r"command=check %H\:%P:pass=1")
    assert spec.checks[0].command == "check %H:%P"
    assert spec.checks[0].passes == (1,)
    assert split_pairs(r"a\:b:c") == ["a:b", "c"]


def test_global_options_anywhere_and_ours():
    spec = parse_monitor("interval=0.5:noenable:connect:nodisable:rise=3:fall=2:stagger=0")
    assert spec.interval == 0.5
    assert not spec.enable and not spec.disable
    assert (spec.rise, spec.fall, spec.stagger) == (3, 2, 0.0)


def test_options_bind_to_the_action_before_them():
    spec = parse_monitor("connect:timeout=1:command=a:pass=3:connect:timeout=2")
    assert [(c.kind, c.timeout, c.passes) for c in spec.checks] == [
        ("connect", 1.0, (0,)), ("command", None, (3,)), ("connect", 2.0, (0,))]


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("interval=5", "no action"),
    ("bogus", "unknown key 'bogus'"),
    ("connect=1", "unexpected value for 'connect'"),
    ("command=", "'command' action requires a value"),
    ("command", "'command' action requires a value"),
    ("pass=0", "'pass' option given without action"),
    ("pass=0:command=x", "'pass' option given without action"),
    ("timeout=1:connect", "timeout must follow a connect"),
    ("connect:pass=0", "'pass' option unsupported for this action"),
    ("command=x:pass=a,b", "pass needs exit codes"),
    ("command=x:pass=256", "pass needs exit codes"),
    ("connect:interval=0", "error parsing interval"),
    ("connect:interval=-1", "error parsing interval"),
    ("connect:interval=nan", "error parsing interval"),
    ("connect:interval=inf", "error parsing interval"),
    ("connect:interval", "error parsing interval"),
    ("connect:timeout=abc", "timeout needs a number"),
    ("connect:rise=0", "rise needs a whole number"),
    ("connect:fall=1.5", "fall needs a whole number"),
    ("connect:stagger=-0.1", "stagger needs a number of at least 0"),
    ("connect:noenable=1", "noenable takes no value"),
    ("connect::interval=1", "empty"),
])
def test_bad_specs_are_rejected_with_exit_69(text, words):
    with pytest.raises(BalanceError) as info:
        parse_monitor(text)
    assert info.value.code == EX_UNAVAILABLE == 69
    assert info.value.message.startswith("invalid monitoring spec: ")
    assert words in info.value.message


@pytest.mark.parametrize("spec", ["bogus", "connect:interval=0", "command=x:pass=x", ""])
def test_cli_bad_spec_exits_69_with_one_line(balance, spec):
    result = balance.run("-f", "-m", spec, str(free_port()), "127.0.0.1:1", timeout=20)
    assert result.returncode == 69
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balance: invalid monitoring spec: ")
    assert "Traceback" not in result.stderr
