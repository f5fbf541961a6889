"""gbalance.system.limits: the descriptor limit and the connection limit drawn from it."""

from __future__ import annotations

import pytest

from gbalance.system.limits import RESERVED_FDS, UNLIMITED, connection_limit


@pytest.mark.parametrize("nofile", [64, 256, 1024, 20000, 1 << 20])
def test_the_default_leaves_room_for_pipes_and_the_rest(nofile):
    """Without -L: every connection (2 fds) and every splice pipe allowed
    (2 fds) fit below the descriptor limit, with descriptors kept aside."""
    lim = connection_limit(None, nofile=nofile)
    assert lim.conns >= 1 and lim.pipes >= 1 and not lim.overcommitted
    assert 2 * lim.conns + 2 * lim.pipes + min(RESERVED_FDS, nofile // 4) <= nofile


def test_the_default_for_common_limits():
    assert connection_limit(None, nofile=256).conns == 88
    assert connection_limit(None, nofile=20000).conns == 9343      # 9,000 idle connections fit
    assert connection_limit(None, nofile=1024).conns == 448


def test_the_default_is_per_process_whatever_the_workers():
    assert connection_limit(None, workers=4, nofile=20000) == connection_limit(None, workers=1, nofile=20000)


def test_an_explicit_limit_is_split_over_the_workers_rounding_up():
    assert connection_limit(10, workers=1, nofile=20000).conns == 10
    assert connection_limit(10, workers=4, nofile=20000).conns == 3
    assert connection_limit(1, workers=8, nofile=20000).conns == 1


def test_an_explicit_limit_leaves_its_spare_descriptors_to_pipes():
    lim = connection_limit(100, nofile=1024)
    assert lim.pipes == (1024 - RESERVED_FDS - 200) // 2


def test_zero_means_no_limit():
    lim = connection_limit(0, nofile=256)
    assert lim.conns == 0 and lim.pipes == UNLIMITED
    assert "no connection limit" in lim.describe()


def test_more_than_the_descriptors_allow_is_said():
    lim = connection_limit(5000, nofile=1024)
    assert lim.overcommitted and lim.conns == 5000 and lim.pipes == 0
    assert "a process may open 1024" in lim.describe()


def test_health_check_sockets_are_kept_aside():
    assert connection_limit(None, nofile=20000, reserve=200).conns == connection_limit(None, nofile=20000).conns - 100
