#!/bin/sh
# Debian packages `make bench` needs: the reference proxy (haproxy), the load
# generators (wrk, iperf3), the short-connection backend (nginx-light) and the
# real clients and their servers (redis-server and redis-benchmark, PostgreSQL and its pgbench),
# and perf (system calls per connection, the native profile).
exec sh "$(dirname "$0")/../packaging/apt-ensure.sh" haproxy wrk iperf3 nginx-light util-linux procps redis-server redis-tools postgresql linux-perf
