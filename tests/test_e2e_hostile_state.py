"""Hostile values from a state file's owner: counts, truncation, addresses, text.

The owner of a state file may write anything into it.  The master must not
write outside its records because of a count it reads back, nobody may die
of SIGBUS because the file was cut short, an address field must not carry
text into a check's argv, and root's terminal sees only printable text.
Where the owner is someone else than the reader, it is a real second user
(uid 65534, tests/otheruser.py).
"""

from __future__ import annotations

import contextlib

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import otheruser
from conftest import eventually, free_port, pid_alive, read_tag, wait_listening
from gbalance.table import layout as L

SLOT0 = len(L.MAGIC)


def put_slot(path: Path, index: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, value.to_bytes(8, sys.byteorder, signed=True), SLOT0 + 8 * index)
    finally:
        os.close(fd)


def get_slot(path: Path, index: int) -> int:
    with open(path, "rb") as f:
        f.seek(SLOT0 + 8 * index)
        return int.from_bytes(f.read(8), sys.byteorder, signed=True)


def put_address(path: Path, g: int, c: int, raw: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, raw.ljust(L.ADDR_LEN, b"\0")[:L.ADDR_LEN],
                  L.ADDR_OFFSET + (g * L.MAXCHANNELS + c) * L.ADDR_LEN)
    finally:
        os.close(fd)


@pytest.mark.parametrize("count", [-8, -100])
def test_a_forged_group_count_never_makes_the_master_write_over_its_header(balance, backends, count):
    b = backends("A")
    port = free_port()
    proc = balance.start(str(port), b.spec, port=port)
    path = balance.state_dir / f"balance.{port}.any"
    put_slot(path, L.H_NGROUPS, count)
    r = balance.run("-c", "create 127.0.0.1 9", str(port), timeout=20)
    assert r.returncode in (0, 69), r
    assert get_slot(path, L.H_VERSION) == L.LAYOUT_VERSION
    assert get_slot(path, L.H_PID) == proc.pid
    assert get_slot(path, L.H_MAXGROUPS) == L.MAXGROUPS
    assert 0 <= get_slot(path, L.H_NGROUPS) <= L.MAXGROUPS or get_slot(path, L.H_NGROUPS) == count
    r = balance.run("-c", "show", str(port), timeout=20)
    assert r.returncode == 0, r.stderr
    assert pid_alive(proc.pid)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_master_survives_its_state_file_cut_short(balance, backends, workers):
    b = backends("A")
    port = free_port()
    proc = balance.start("-w", workers, str(port), b.spec, port=port)
    assert read_tag(port) == "A"
    path = balance.state_dir / f"balance.{port}.any"
    os.truncate(path, 0)
    for _ in range(3):          # routing reads the table: the first access faults
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                s.recv(10)
        except OSError:
            pass
    time.sleep(0.3)
    assert proc.p.poll() is None, proc.stop()
    r = balance.run("-c", "show", str(port), timeout=20)
    assert r.returncode > 0 and "Traceback" not in r.stderr, r
    out, err = proc.stop()
    assert proc.p.returncode == 0, (proc.p.returncode, err)
    assert "died" not in err, err


def _nobody_master(state_dir: Path, port: int, *args: str) -> subprocess.Popen:
    """``balance -f args`` as the other user (``args`` hold the port)."""
    env = dict(os.environ, BALANCE_STATE_DIR=str(state_dir))
    p = otheruser.popen(otheruser.balance_argv("-f", *args), env)
    try:
        wait_listening(port, timeout=20)
        assert eventually(lambda: (state_dir / f"balance.{port}.any").exists())
    except BaseException:
        p.kill()
        p.communicate()
        raise
    return p


def _end(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()


def test_roots_shell_survives_another_users_file_cut_short(backends):
    otheruser.require_root()
    b = backends("A")
    port = free_port()
    with otheruser.temp_dir("gbal-owner-", 0o755) as d:
        os.chown(d, otheruser.NOBODY, otheruser.NOBODY)
        master = _nobody_master(d, port, str(port), b.spec)
        try:
            env = dict(os.environ, BALANCE_STATE_DIR=str(d))
            shell = subprocess.Popen([sys.executable, "-m", "gbalance", "-i", str(port)], env=env,
                                     cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
            try:
                shell.stdin.write(b"show\n")
                shell.stdin.flush()
                time.sleep(1.0)      # attached and mapped
                otheruser.run_code("import os, sys; os.truncate(sys.argv[1], 0)",
                                   str(d / f"balance.{port}.any"))
                shell.stdin.write(b"show\nshow\nquit\n")
                shell.stdin.flush()
                out, err = shell.communicate(timeout=20)
            finally:
                if shell.poll() is None:
                    shell.kill()
                    shell.communicate()
            assert shell.returncode >= 0, (shell.returncode, err)
            assert b"Traceback" not in err, err
        finally:
            _end(master)


def _control_chars(text: bytes) -> set[int]:
    return {ch for ch in text if (ch < 0x20 and ch != 0x0a) or ch >= 0x7f}


def test_root_sees_only_printable_text_from_another_users_file(backends):
    otheruser.require_root()
    b = backends("A")
    port = free_port()
    with otheruser.temp_dir("gbal-owner-", 0o755) as d:
        os.chown(d, otheruser.NOBODY, otheruser.NOBODY)
        master = _nobody_master(d, port, "-m", "connect:interval=60", str(port), b.spec)
        try:
            forged = b"\x1b]0;owned\x07\x1b[2J\r\n0 RR 9 ENA \xff\x9b1m"
            otheruser.run_code(f"""
                import os, sys
                fd = os.open(sys.argv[1], os.O_WRONLY)
                os.pwrite(fd, {forged!r}.ljust({L.ADDR_LEN}, b"\\0"), {L.ADDR_OFFSET})
            """, str(d / f"balance.{port}.any"))
            env = dict(os.environ, BALANCE_STATE_DIR=str(d))
            for cmd in ("show", "health"):
                r = subprocess.run([sys.executable, "-m", "gbalance", "-c", cmd, str(port)], env=env,
                                   cwd="/", capture_output=True, timeout=20)
                assert r.returncode == 0, r.stderr
                assert not _control_chars(r.stdout), r.stdout
                assert b"?]0;owned?" in r.stdout
            r = subprocess.run([sys.executable, "-m", "gbalance", "-i", str(port)], env=env, cwd="/",
                               input=b"show\nhealth\n", capture_output=True, timeout=20)
            assert r.returncode == 0 and not _control_chars(r.stdout), r.stdout
        finally:
            _end(master)


def test_a_scope_id_naming_no_interface_is_no_address(balance, backends, tmp_path):
    """A forged ``::1%<text>`` is not checked (its text never reaches a command),
    and the shell refuses such an address."""
    out = tmp_path / "checked"
    b = backends("A")
    port = free_port()
    spec = f"command=/bin/sh -c 'echo %H >> {out}':interval=0.2"
    proc = balance.start("-m", spec, str(port), b.spec, port=port)
    assert eventually(lambda: out.exists() and "127.0.0.1" in out.read_text())
    path = balance.state_dir / f"balance.{port}.any"
    put_address(path, 0, 0, b"::1%evil")
    time.sleep(1.0)
    assert "evil" not in out.read_text()
    r = balance.run("-c", "create [::1%nosuchif0] 80", str(port))
    assert "invalid address" in r.stdout + r.stderr
    r = balance.run("-c", "create [::1%lo] 80", str(port))
    assert r.returncode == 0 and "invalid" not in r.stdout + r.stderr
    assert pid_alive(proc.pid)


def test_a_umask_of_077_keeps_the_state_file_0600_across_start_and_r(balance, backends):
    """The README's "make the state file 0600": start balance with umask 077
    (systemd: UMask=0077); a daemon start and a -r hand-over keep it so."""
    b = backends("A")
    port = free_port()
    path = balance.state_dir / f"balance.{port}.any"
    strict = lambda: os.umask(0o077)     # noqa: E731
    from conftest import BALANCE
    pids = []
    try:
        for extra in ([], ["-r"]):
            r = subprocess.run(BALANCE + [*extra, str(port), b.spec], env=balance.env, cwd="/",
                               capture_output=True, text=True, timeout=30, preexec_fn=strict)
            assert r.returncode == 0, r.stderr
            assert eventually(lambda: path.exists() and get_slot(path, L.H_PID) not in pids + [0])
            pids.append(get_slot(path, L.H_PID))
            balance.daemon_pids.append(pids[-1])
            assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
            assert read_tag(port) == "A"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
