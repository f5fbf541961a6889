#!/bin/sh
# Debian packages `make bench` needs: the reference proxy (haproxy), the load
# generators (wrk, iperf3) and the short-connection backend (nginx-light).
exec sh "$(dirname "$0")/../packaging/apt-ensure.sh" haproxy wrk iperf3 nginx-light util-linux procps
