"""The ``balance`` command line, driven as a real subprocess.

Every bad input gets its sysexits code and one clear message, never a
traceback; good inputs really listen where they should (``-6``, ``-b``,
service names); ``-d`` prints balance's trace.  Pure argv parsing is also
checked in-process through :func:`gbalance.cli.parse`.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from conftest import free_port, Backend, ipv6_available, read_tag, wait_port
from gbalance import __version__
from gbalance.cli import USAGE, parse
from gbalance.config import ProxyConfig, ShellConfig
from gbalance.errors import BalanceError
from gbalance.table.layout import HASH, RR

USAGE_LINE = "  balance [-b addr] [-B addr] [-t sec] [-T sec]"

C64 = ["127.0.0.1"] * 64
G32 = ["127.0.0.1", "!"] * 31 + ["127.0.0.1"]

# (argv, exit code, text that stderr must contain)
BAD_INPUT = [
    (["-x", "8080", "127.0.0.1"], 64, "unknown option -x"),
    (["-fx", "8080", "127.0.0.1"], 64, "unknown option -x"),
    (["--nosuch", "8080", "127.0.0.1"], 64, "unknown option --nosuch"),
    (["8080", "127.0.0.1", "-Q"], 64, "unknown option -Q"),
    (["-t"], 64, "option -t requires an argument"),
    (["8080", "127.0.0.1", "-b"], 64, "option -b requires an argument"),
    (["-f", "-k"], 64, "option -k requires an argument"),
    (["-c"], 64, "option -c requires an argument"),
    ([], 64, USAGE_LINE),
    (["-f"], 64, USAGE_LINE),
    (["-6"], 64, USAGE_LINE),
    (["-c", "show"], 64, USAGE_LINE),
    (["-i"], 64, USAGE_LINE),
    (["-i", "-c", "show", "8080"], 64, USAGE_LINE),
    (["0", "127.0.0.1"], 64, "invalid port [0]"),
    (["65536", "127.0.0.1"], 64, "invalid port [65536]"),
    (["70000", "127.0.0.1"], 64, "invalid port [70000]"),
    (["nosuchservice", "127.0.0.1"], 64, "invalid port [nosuchservice]"),
    (["-c", "show", "70000"], 64, "invalid port [70000]"),
    (["8080", "127.0.0.1:0"], 64, "invalid port [0]"),
    (["8080", "127.0.0.1:65536"], 64, "invalid port [65536]"),
    (["8080", "127.0.0.1:nosuchservice"], 64, "invalid port [nosuchservice]"),
    (["8080", "127.0.0.1::x"], 64, "invalid maxc [x]"),
    (["8080", "127.0.0.1::99999999999999999999"], 64, "invalid maxc [99999999999999999999]"),
    (["8080", *C64, "127.0.0.1"], 64, "MAXCHANNELS exceeded"),
    (["8080", *G32, "!", "127.0.0.1"], 69, "too many groups"),
    (["8080", *G32, "%", "127.0.0.1"], 69, "too many groups"),
    (["8080", "a", "!", "!", "b"], 69, "no channels in group"),
    (["8080", "127.0.0.1", "!"], 69, "no channels in group"),
    (["8080", "!", "127.0.0.1"], 69, "no channels in group"),
    (["8080", "%", "127.0.0.1"], 69, "no channels in group"),
    (["8080", "nosuchhost.invalid"], 65, "unknown or invalid address [nosuchhost.invalid]"),
    (["8080", "nosuchhost.invalid:80:3"], 65, "unknown or invalid address [nosuchhost.invalid]"),
    (["8080", "[::1"], 65, "unknown or invalid address [[::1]"),
    (["-k", "1,2", "8080", "127.0.0.1"], 64, "invalid keepalive [1,2] for -k"),
    (["-k", "0,1,1", "8080", "127.0.0.1"], 64, "invalid keepalive [0,1,1] for -k"),
    (["-K", "x,y,z", "8080", "127.0.0.1"], 64, "invalid keepalive [x,y,z] for -K"),
    (["-K", "99999999999,1,1", "8080", "127.0.0.1"], 64, "invalid keepalive [99999999999,1,1] for -K"),
    (["-t", "-1", "8080", "127.0.0.1"], 64, "invalid timeout [-1] for -t"),
    (["-t", "abc", "8080", "127.0.0.1"], 64, "invalid timeout [abc] for -t"),
    (["-T", "nan", "8080", "127.0.0.1"], 64, "invalid timeout [nan] for -T"),
    (["-T", "-5", "8080", "127.0.0.1"], 64, "invalid timeout [-5] for -T"),
    (["-L", "-1", "8080", "127.0.0.1"], 64, "invalid connection limit [-1] for -L"),
    (["-L", "many", "8080", "127.0.0.1"], 64, "invalid connection limit [many] for -L"),
    (["-l", "2147483648", "8080", "127.0.0.1"], 64, "invalid connection limit [2147483648] for -l"),
    (["-l", "٣", "8080", "127.0.0.1"], 64, "for -l"),
    (["8080", "127.0.0.1", "-L"], 64, "option -L requires an argument"),
    (["-m", "bogus", "8080", "127.0.0.1"], 69, "invalid monitoring spec"),
    (["-m", "connect:interval=0", "8080", "127.0.0.1"], 69, "interval"),
    (["-m", "", "8080", "127.0.0.1"], 69, "invalid monitoring spec"),
]


def _ids(case) -> str:
    return " ".join(case[0])[:60] or "(no arguments)"


@pytest.mark.parametrize("argv,code,message", BAD_INPUT, ids=[_ids(c) for c in BAD_INPUT])
def test_bad_input(balance, argv, code, message):
    r = balance.run(*argv, timeout=20)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    first = r.stderr.splitlines()[0]
    assert first.startswith("balance: ") and message.strip() in r.stderr


def test_usage_errors_print_usage(balance):
    r = balance.run("-x", "8080", "127.0.0.1")
    lines = r.stderr.splitlines()
    assert lines[0] == "balance: unknown option -x"
    assert lines[1] == "Usage:"
    assert any(line.startswith("  balance [-b addr] -i [-d] [-M] <port>") for line in lines)


def test_address_in_use(balance):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        for args in (["-f", str(port), "127.0.0.1:1"], ["-f", "-b", "127.0.0.1", str(port), "127.0.0.1:1"]):
            r = balance.run(*args, timeout=20)
            assert r.returncode == 71, r.stderr
            assert "Address already in use" in r.stderr
            assert "Traceback" not in r.stderr
    # The failed start left no state file behind to confuse a later master.
    assert not list(balance.state_dir.glob(f"balance.{port}.*"))


@pytest.mark.parametrize("bind,text", [("nosuchhost.invalid", "nosuchhost.invalid"),
                                       ("192.0.2.1", "Cannot assign requested address")])
def test_bad_bind_address(balance, bind, text):
    r = balance.run("-f", "-b", bind, str(free_port()), "127.0.0.1:1", timeout=20)
    assert r.returncode == 71, r.stderr
    assert text in r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_state_directory(balance, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    balance.env["BALANCE_STATE_DIR"] = str(blocker / "sub")
    r = balance.run("-f", str(free_port()), "127.0.0.1:1", timeout=20)
    assert r.returncode == 71, r.stderr
    assert "cannot create state directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_master(balance):
    r = balance.run("-c", "show", str(free_port()))
    # The spec allows 69 or 70 (balance's own); gbalance always says 69,
    # and 70 (EX_SOFTWARE) would be an internal error here, never a pass.
    assert r.returncode == 69, r.stderr
    assert "no master process" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_and_version(balance):
    for flag in ("--help", "-h"):
        r = balance.run(flag)
        assert r.returncode == 0
        assert r.stdout == USAGE
        assert r.stdout.startswith("Usage:\n")
        assert USAGE_LINE in r.stdout
        assert "  -6  " in r.stdout and "  -m spec  " in r.stdout
        assert r.stderr == ""
    r = balance.run("--version")
    assert r.returncode == 0
    assert r.stdout == f"balance {__version__} (gbalance)\n"


# -- good command lines, in-process ------------------------------------------------

def test_parse_proxy_options():
    cfg = parse(["-6", "-a", "-d", "-f", "-p", "-H", "-M", "-b", "::1", "-B", "127.0.0.1",
                 "-t", "2.5", "-T", "30", "-k", "60,10,5", "-K", "30,5,3",
                 "-m", "connect:interval=5", "smtp", "127.0.0.1:http", "%", "[::1]::4"])
    assert isinstance(cfg, ProxyConfig)
    assert (cfg.port, cfg.bind, cfg.source) == (25, "::1", "127.0.0.1")
    assert (cfg.connect_timeout, cfg.idle_timeout) == (2.5, 30.0)
    assert cfg.ipv6 and cfg.autodisable and cfg.debug and cfg.foreground
    assert cfg.packet_dump and cfg.hash_failover
    assert (cfg.client_keepalive, cfg.server_keepalive) == ((60, 10, 5), (30, 5, 3))
    assert cfg.monitor is not None and cfg.monitor.interval == 5.0
    assert [g.kind for g in cfg.groups] == [HASH, RR]
    ch0, ch1 = cfg.groups[0].channels[0], cfg.groups[1].channels[0]
    assert (ch0.address, ch0.port, ch0.maxc) == ("127.0.0.1", 80, 0)
    assert (ch1.address, ch1.port, ch1.maxc) == ("::1", 25, 4)


def test_parse_defaults_and_combined_flags():
    cfg = parse(["-fp6", "8080", "127.0.0.1"])
    assert cfg.foreground and cfg.packet_dump and cfg.ipv6
    assert not (cfg.debug or cfg.autodisable or cfg.hash_failover)
    assert (cfg.connect_timeout, cfg.idle_timeout) == (5.0, 0.0)
    assert cfg.client_keepalive is None and cfg.monitor is None
    assert parse(["-t5", "8080"]).connect_timeout == 5.0
    assert parse(["8080"]).groups == []
    assert (cfg.max_conns, cfg.per_source) == (None, 0)     # -L from the fd limit, no -l


def test_parse_connection_limits():
    cfg = parse(["-L", "5000", "-l", "50", "8080", "127.0.0.1"])
    assert (cfg.max_conns, cfg.per_source) == (5000, 50)
    cfg = parse(["-L0", "-l0", "8080", "127.0.0.1"])
    assert (cfg.max_conns, cfg.per_source) == (0, 0)


def test_parse_shell_forms():
    cfg = parse(["-b", "127.0.0.1", "-c", "disable 0", "-d", "8080"])
    assert cfg == ShellConfig(port=8080, bind="127.0.0.1", command="disable 0", debug=True)
    cfg = parse(["-i", "-M", "http"])
    assert cfg == ShellConfig(port=80, bind=None, command=None, debug=False)


def test_parse_raises_balance_error_only():
    with pytest.raises(BalanceError) as info:
        parse(["-6"])
    assert info.value.code == 64


# -- good command lines, for real ------------------------------------------------------

def test_dash6_listens_on_both_families(balance, backends):
    """docopt 0.6.2 reads ``-6`` as an option (docopt-ng would take it as a port)."""
    assert ipv6_available()
    b = backends("six")
    port = free_port()
    balance.start("-6", str(port), b.spec, port=port)
    assert read_tag(port, "::1") == "six"
    assert read_tag(port, "127.0.0.1") == "six"


def test_without_dash6_ipv4_only(balance, backends):
    b = backends("four")
    port = free_port()
    balance.start(str(port), b.spec, port=port)
    assert read_tag(port) == "four"
    with pytest.raises(OSError), socket.create_connection(("::1", port), timeout=2):
        pass


def test_service_names_for_listen_and_channel_ports(balance):
    """``smtp`` is the listening port, ``http`` a channel's port (checked in the -d trace)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 25), timeout=1):
        raise AssertionError("something already listens on 127.0.0.1:25")
    proc = balance.start("-d", "-b", "127.0.0.1", "smtp", "127.0.0.1:http", "127.0.0.1:smtp:3",
                         port=25)
    out, err = proc.stop()
    assert "the following channels are active:\n" in err
    assert "  0  0 127.0.0.1:80:0\n" in err
    assert "  0  1 127.0.0.1:25:3\n" in err
    assert "Traceback" not in err


def test_debug_trace(balance, backends):
    """``-d``: the channel list, then refused, timed out and successful attempts."""
    good = backends("good")
    refused = free_port()
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        _fill_accept_queue(full, fillers)
        fport = full.getsockname()[1]
        port = free_port()
        # No probe connection (it would add its own trace): wait for the bind instead.
        proc = balance.start("-d", "-t", "1", str(port), f"127.0.0.1:{refused}", "!",
                             f"127.0.0.1:{fport}:7", "!", good.spec, port=port, wait=False)
        wait_bound(port)
        started = time.monotonic()
        assert read_tag(port) == "good"
        waited = time.monotonic() - started
        out, err = proc.stop()
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert 0.9 <= waited < 4.0, waited
    expected = ("the following channels are active:\n"
                f"  0  0 127.0.0.1:{refused}:0\n"
                f"  1  0 127.0.0.1:{fport}:7\n"
                f"  2  0 {good.spec}:0\n"
                f"trying group 0 channel 0 ... connection refused group 0 channel 0\n"
                f"trying group 1 channel 0 ... timeout group 1 channel 0\n"
                f"trying group 2 channel 0 ... connect to channel 0 successful\n")
    assert expected in err, err
    assert "Traceback" not in err


def wait_bound(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ``port``, without connecting to it
    (``/proc/net/tcp`` lists listeners with state 0A)."""
    needle = f":{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if needle in f.read():
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def _fill_accept_queue(listener: socket.socket, fillers: list[socket.socket]) -> None:
    """Connect until the listener's accept queue is full and SYNs are dropped."""
    addr = listener.getsockname()
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        fillers.append(s)
        if s.connect_ex(addr) not in (0, 115):  # 115: EINPROGRESS
            continue
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _connected(s):
                break
            time.sleep(0.01)
        else:
            return  # this one hangs: the queue is full
    raise AssertionError("accept queue never filled")


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def test_started_master_is_really_serving(balance, backends):
    """Sanity for the cases above: a good command line proxies, and wait_port saw it."""
    b = backends("ok")
    port = free_port()
    balance.start("-b", "127.0.0.1", str(port), f"localhost:{b.port}", port=port)
    wait_port(port)
    assert read_tag(port) == "ok"


def test_bare_ipv6_channel_uses_the_listening_port(balance):
    """``::1`` (no brackets, no port) is an address, and its port is the listening port:
    the IPv4-only listener on 0.0.0.0:P and the backend on [::1]:P do not collide."""
    port = free_port()
    backend = Backend("bare-v6", host="::1", port=port)
    try:
        balance.start(str(port), "::1", port=port)
        assert read_tag(port) == "bare-v6"
    finally:
        backend.close()
