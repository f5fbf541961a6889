"""A listener's accept queue length (gbalance.system.backlog), on real sockets."""

from __future__ import annotations

import socket

from gbalance.system.backlog import accept_queue_length, queue_probe


def test_the_accept_queue_length_of_a_real_listener():
    with socket.create_server(("127.0.0.1", 0), backlog=16) as srv:
        port = srv.getsockname()[1]
        assert accept_queue_length(srv) == 0
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            assert accept_queue_length(srv) == 3
            conn, _ = srv.accept()
            conn.close()
            assert accept_queue_length(srv) == 2
        finally:
            for c in clients:
                c.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        assert accept_queue_length(plain) is None            # not listening
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert accept_queue_length(udp) is None


def test_the_probe_is_the_listener_s_own_getsockopt():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        probe = queue_probe(srv)
        assert probe is not None and probe.__self__ is srv
