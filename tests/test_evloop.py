"""evloop.install_hub: a hub on a libev loop without the per-turn fork check.

Each case runs in a fresh interpreter: a hub, once made, stays for the process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

LIMIT = 30


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_installed_hub_has_no_fork_check_and_serves_timers_signals_and_sockets():
    out = run("""
        import os, signal, socket
        from gbalance.system.evloop import install_hub
        assert install_hub()
        import gevent, gevent.socket
        loop = gevent.get_hub().loop
        assert 'forkcheck' not in loop.origflags, loop.origflags
        got = []
        gevent.signal_handler(signal.SIGUSR1, lambda: got.append('sig'))
        gevent.spawn_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
        a, b = gevent.socket.socketpair()
        gevent.spawn_later(0.02, a.sendall, b'ping')
        assert b.recv(4) == b'ping'
        with gevent.Timeout(5):
            while not got:
                gevent.sleep(0.01)
        print(got[0], loop.default)
    """)
    assert out == "sig False"


def test_gevents_own_loop_checks_forks():
    """What install_hub saves: gevent's usual loop has the check."""
    out = run("""
        import gevent
        print('forkcheck' in gevent.get_hub().loop.origflags)
    """)
    assert out == "True"


def test_existing_hub_is_left_alone():
    out = run("""
        import gevent
        hub = gevent.get_hub()
        from gbalance.system.evloop import install_hub
        print(install_hub(), gevent.get_hub() is hub, gevent.get_hub().loop.default)
    """)
    assert out == "False True True"
