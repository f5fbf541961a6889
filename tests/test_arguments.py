"""Unit tests of gbalance.arguments: ports, channel words, groups, keepalive, seconds.

These run in-process against the real resolver (``localhost`` and
``/etc/services``); only the IPv4-preference test replaces getaddrinfo,
because no host name here resolves to both families.
"""

from __future__ import annotations

import socket

import pytest

from gbalance.errors import EX_DATAERR, EX_UNAVAILABLE, EX_USAGE, BalanceError
from gbalance.arguments import (ChannelSpec, parse_channel, parse_groups, parse_keepalive, parse_maxc,
                           parse_port, parse_seconds, resolve_host, split_channel, split_groups)
from gbalance.table.layout import HASH, MAXCHANNELS, MAXGROUPS, RR


def fails(fn, *args) -> BalanceError:
    """Call ``fn`` and return the BalanceError it must raise."""
    with pytest.raises(BalanceError) as info:
        fn(*args)
    return info.value


# -- ports ---------------------------------------------------------------------

@pytest.mark.parametrize("word,port", [("1", 1), ("80", 80), ("65535", 65535), ("080", 80),
                                       ("smtp", 25), ("http", 80)])
def test_port_accepts_numbers_and_service_names(word, port):
    assert parse_port(word) == port
    assert socket.getservbyname("smtp", "tcp") == 25  # the services file is the real one


@pytest.mark.parametrize("word", ["0", "65536", "70000", "nosuchservice", "-1", "", "8o",
                                  "\u0668\u0660", "\u00b2", "1.5", "99999999999999999999"])
def test_port_rejects_bad_words(word):
    err = fails(parse_port, word)
    assert err.code == EX_USAGE
    assert err.message == f"invalid port [{word}]"


# -- splitting a channel word ---------------------------------------------------

@pytest.mark.parametrize("word,parts", [
    ("web", ("web", None, None)),
    ("web:81", ("web", "81", None)),
    ("web:81:10", ("web", "81", "10")),
    ("web::10", ("web", None, "10")),
    ("web:", ("web", None, None)),
    ("[::1]", ("::1", None, None)),
    ("[::1]:81", ("::1", "81", None)),
    ("[::1]:81:7", ("::1", "81", "7")),
    ("[2001:db8::1]::7", ("2001:db8::1", None, "7")),
    ("2001:db8::1", ("2001:db8::1", None, None)),
    ("::1", ("::1", None, None)),
    ("::ffff:127.0.0.1", ("::ffff:127.0.0.1", None, None)),
    ("web:smtp", ("web", "smtp", None)),
])
def test_split_channel(word, parts):
    assert split_channel(word) == parts


@pytest.mark.parametrize("word", ["[::1", "[::1]x", "[::1]81", "2001:db8::zz", "a:b:c:d"])
def test_split_channel_rejects_garbage(word):
    err = fails(split_channel, word)
    assert err.code == EX_DATAERR
    assert err.message == f"unknown or invalid address [{word}]"


# -- whole channels ---------------------------------------------------------------

@pytest.mark.parametrize("word,expected", [
    ("127.0.0.1", ChannelSpec("127.0.0.1", "127.0.0.1", 8080, 0)),
    ("127.0.0.1:81", ChannelSpec("127.0.0.1", "127.0.0.1", 81, 0)),
    ("127.0.0.1:81:5", ChannelSpec("127.0.0.1", "127.0.0.1", 81, 5)),
    ("127.0.0.1::5", ChannelSpec("127.0.0.1", "127.0.0.1", 8080, 5)),
    ("localhost:smtp", ChannelSpec("localhost", "127.0.0.1", 25, 0)),
    ("localhost:http:3", ChannelSpec("localhost", "127.0.0.1", 80, 3)),
    ("[::1]", ChannelSpec("::1", "::1", 8080, 0)),
    ("[::1]:81", ChannelSpec("::1", "::1", 81, 0)),
    ("[::1]:81:9", ChannelSpec("::1", "::1", 81, 9)),
    ("[0:0::1]:81", ChannelSpec("0:0::1", "::1", 81, 0)),
    ("::1", ChannelSpec("::1", "::1", 8080, 0)),
    ("2001:db8::1", ChannelSpec("2001:db8::1", "2001:db8::1", 8080, 0)),
])
def test_parse_channel(word, expected):
    assert parse_channel(word, 8080) == expected


@pytest.mark.parametrize("word,code,message", [
    ("nosuchhost.invalid", EX_DATAERR, "unknown or invalid address [nosuchhost.invalid]"),
    ("nosuchhost.invalid:80", EX_DATAERR, "unknown or invalid address [nosuchhost.invalid]"),
    (":80", EX_DATAERR, "unknown or invalid address [:80]"),
    ("[]:80", EX_DATAERR, "unknown or invalid address [[]:80]"),
    ("127.0.0.1:0", EX_USAGE, "invalid port [0]"),
    ("127.0.0.1:70000", EX_USAGE, "invalid port [70000]"),
    ("127.0.0.1:nosuchservice", EX_USAGE, "invalid port [nosuchservice]"),
    ("127.0.0.1::x", EX_USAGE, "invalid maxc [x]"),
    ("127.0.0.1::-1", EX_USAGE, "invalid maxc [-1]"),
    ("127.0.0.1::\u00b2", EX_USAGE, "invalid maxc [\u00b2]"),
    ("127.0.0.1::99999999999999999999", EX_USAGE, "invalid maxc [99999999999999999999]"),
])
def test_parse_channel_errors(word, code, message):
    err = fails(parse_channel, word, 8080)
    assert (err.code, err.message) == (code, message)


def test_maxc_bounds():
    assert parse_maxc("0") == 0
    assert parse_maxc(str(2**31 - 1)) == 2**31 - 1
    assert fails(parse_maxc, str(2**31)).code == EX_USAGE


def test_names_prefer_ipv4(monkeypatch):
    """A name with both families means its IPv4 address, as in balance."""
    both = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::5", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: both)
    assert resolve_host("dual.example") == "192.0.2.5"
    assert resolve_host("dual.example", prefer_ipv4=False) == "2001:db8::5"
    only6 = both[:1]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: only6)
    assert resolve_host("six.example") == "2001:db8::5"


def test_real_resolver():
    assert resolve_host("localhost") == "127.0.0.1"
    assert resolve_host("::ffff:127.0.0.1") == "::ffff:127.0.0.1"
    assert fails(resolve_host, "nosuchhost.invalid").code == EX_DATAERR


# -- groups -------------------------------------------------------------------------

def test_groups_bang_and_percent():
    groups = parse_groups(["127.0.0.1:1", "127.0.0.1:2", "%", "127.0.0.1:3", "!",
                           "[::1]:4", "%"], 80)
    assert [g.kind for g in groups] == [HASH, RR, HASH]
    assert [[c.port for c in g.channels] for g in groups] == [[1, 2], [3], [4]]
    assert groups[2].channels[0].address == "::1"


def test_no_channels_is_no_groups():
    assert parse_groups([], 80) == []


@pytest.mark.parametrize("words", [["a", "!", "!", "b"], ["a", "!"], ["!", "a"], ["%", "a"],
                                   ["a", "%", "!", "b"], ["a", "!", "%"], ["!"]])
def test_empty_groups(words):
    # Structure is checked before any name is resolved: "a" never reaches DNS.
    err = fails(parse_groups, words, 80)
    assert (err.code, err.message) == (EX_UNAVAILABLE, "no channels in group")


def test_group_limit():
    ok = ["h", "!"] * (MAXGROUPS - 1) + ["h"]
    assert len(split_groups(ok)) == MAXGROUPS
    assert len(split_groups(ok + ["%"])) == MAXGROUPS
    err = fails(split_groups, ok + ["!", "h"])
    assert (err.code, err.message) == (EX_UNAVAILABLE, "too many groups")
    err = fails(split_groups, ok + ["%", "h"])
    assert err.message == "too many groups"


def test_channel_limit():
    full = ["127.0.0.1"] * MAXCHANNELS
    assert len(parse_groups(full, 80)[0].channels) == MAXCHANNELS
    err = fails(parse_groups, full + ["127.0.0.1"], 80)
    assert (err.code, err.message) == (EX_USAGE, "MAXCHANNELS exceeded")
    # The limit is per group.
    groups = parse_groups(full + ["!"] + full, 80)
    assert [len(g.channels) for g in groups] == [MAXCHANNELS, MAXCHANNELS]


# -- option values --------------------------------------------------------------------

def test_keepalive():
    assert parse_keepalive("60,10,5", "-k") == (60, 10, 5)
    assert parse_keepalive("32767,32767,127", "-K") == (32767, 32767, 127)


@pytest.mark.parametrize("text", ["", "1,2", "1,2,3,4", "0,1,1", "1,0,1", "1,1,0", "x,1,1",
                                  "-1,1,1", "32768,1,1", "1,32768,1", "1,1,128",
                                  "99999999999,1,1", "1.5,1,1", "\u0665,1,1"])
def test_keepalive_rejects(text):
    err = fails(parse_keepalive, text, "-K")
    assert err.code == EX_USAGE
    assert err.message.startswith(f"invalid keepalive [{text}] for -K")


@pytest.mark.parametrize("text,value", [("0", 0.0), ("5", 5.0), ("0.5", 0.5), (".25", 0.25),
                                        ("10.", 10.0)])
def test_seconds(text, value):
    assert parse_seconds(text, "-t") == value


@pytest.mark.parametrize("text", ["", "-1", "x", "nan", "inf", "1e3", "1_0", "\u0665", "9" * 400])
def test_seconds_rejects(text):
    err = fails(parse_seconds, text, "-T")
    assert (err.code, err.message) == (EX_USAGE, f"invalid timeout [{text}] for -T")


@pytest.mark.parametrize("word", ["::1%nosuchif0", "::1%; rm -rf /", "fe80::1%\x1b[2J", "::1%99999"])
def test_a_scope_id_must_name_an_interface(word):
    with pytest.raises(BalanceError) as info:
        resolve_host(word)
    assert info.value.code == EX_DATAERR


def test_a_scope_id_naming_an_interface_is_kept():
    import socket as _socket
    index = _socket.if_nametoindex("lo")
    assert resolve_host("fe80::1%lo") == "fe80::1%lo"
    assert resolve_host(f"::1%{index}") == f"::1%{index}"


@pytest.mark.parametrize("text,ok", [
    ("::1", True), ("::1%lo", True), ("::1%nosuchif0", False), ("::1%a b", False),
    ("::1%\n0 RR", False), ("127.0.0.1", True), ("127.0.0.1%lo", False),
])
def test_valid_address_checks_scope_ids(text, ok):
    from gbalance.table.channels import valid_address
    assert valid_address(text) is ok
