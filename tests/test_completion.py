"""Tab completion in ``balance -i`` (gbalance/shell/completion.py).

In process: the candidates for each kind of argument.  Through a real
pseudo-terminal: Tab completes a command and a channel number in a real
``balance -i`` session against a real master.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

from conftest import BALANCE, free_port

from gbalance.shell.completion import Completer, arg_kinds, syntaxes_from
from gbalance.shell.shell import COMMANDS


def completer(groups: int = 2, channels: dict | None = None, current: int = 0) -> Completer:
    channels = channels if channels is not None else {0: 3, 1: 12}
    return Completer(syntaxes_from(COMMANDS), lambda: groups, lambda g: channels.get(g, 0), lambda: current)


def test_synopsis_kinds():
    assert arg_kinds("<group> <channel>") == ("group", "channel")
    assert arg_kinds("[enable|disable|show]") == ("words:enable|disable|show",)
    assert arg_kinds("<channel> <host> <port>") == ("channel", "other", "other")
    assert arg_kinds("") == ()


def test_command_names():
    c = completer()
    assert c.candidates("", "dis") == ["disable "]
    assert c.candidates("", "mrtg") == ["mrtg-bytes ", "mrtg-conns "]
    assert c.candidates("", "RE") == ["reset "]
    assert "? " not in c.candidates("", "")   # "?" is help's alias, not a word to offer
    assert len(c.candidates("", "")) == len([x for x in COMMANDS if x.name != "?"])
    assert c.candidates("", "x") == []


def test_channel_numbers_of_the_current_group():
    c = completer(current=1)
    assert c.candidates("disable ", "") == [str(n) for n in range(12)]
    assert c.candidates("disable ", "1") == ["1", "10", "11"]
    assert c.candidates("en ", "") == [str(n) for n in range(12)]   # abbreviation, as the shell reads it
    assert c.candidates("assign ", "") == [f"{n} " for n in range(12)]   # more arguments follow
    assert c.candidates("assign 1 ", "") == []   # a host name: nothing to offer
    assert c.candidates("disable 1 ", "") == []   # no second argument


def test_group_then_channel_of_that_group():
    c = completer(current=1)
    assert c.candidates("group ", "") == ["0", "1"]
    assert c.candidates("mrtg-bytes ", "") == ["0 ", "1 "]
    assert c.candidates("mrtg-bytes 0 ", "") == ["0", "1", "2"]
    assert c.candidates("mrtg-conns 7 ", "") == []
    assert c.candidates("mrtg-conns x ", "") == []


def test_words_and_unknown_commands():
    c = completer()
    assert c.candidates("monitor ", "") == ["enable", "disable", "show"]
    assert c.candidates("monitor ", "d") == ["disable"]
    assert c.candidates("frob ", "") == []
    assert c.candidates("show ", "") == []


def test_state_trouble_means_no_candidates():
    def broken(group: int) -> int:
        raise ValueError("mmap closed")
    c = Completer(syntaxes_from(COMMANDS), lambda: 1, broken, lambda: 0)
    assert c.candidates("disable ", "") == []


def read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_tab_completes_in_a_real_terminal_session(tmp_path, balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    balance.start(str(port), a.spec, b.spec, port=port)
    (tmp_path / "cwd").mkdir()   # no file names for readline's default completion to find
    env = dict(balance.env, TERM="dumb", HOME=str(tmp_path), INPUTRC="/dev/null")
    master_fd, slave_fd = pty.openpty()
    shell = subprocess.Popen(BALANCE + ["-i", str(port)], env=env, stdin=slave_fd, stdout=slave_fd,
                             stderr=slave_fd, cwd=tmp_path / "cwd", start_new_session=True)
    os.close(slave_fd)
    try:
        read_until(master_fd, b"balance[0] ")
        os.write(master_fd, b"dis\t")
        read_until(master_fd, b"disable ")
        os.write(master_fd, b"1\n")
        read_until(master_fd, b"channel 1 disabled")
        os.write(master_fd, b"mrtg-b\t")
        read_until(master_fd, b"mrtg-bytes ")
        os.write(master_fd, b"\x15")   # clear the line (Ctrl-U)
        os.write(master_fd, b"en\t1\t\n")
        out = read_until(master_fd, b"channel 1 enabled")
        assert b"enable 1" in out
        os.write(master_fd, b"quit\n")
        assert shell.wait(timeout=10) == 0
    finally:
        if shell.poll() is None:
            os.kill(shell.pid, signal.SIGKILL)
            shell.wait(timeout=10)
        os.close(master_fd)
    show = balance.run("-c", "show", str(port)).stdout
    assert " ENA " in show and " DIS " not in show
