#!/bin/sh
# Debian packages the test suite needs, installed when missing (`make test`).
# These are build and check tools only: nothing of gbalance is installed on
# the host, and its configuration is not changed (the packaging tests
# install into a throwaway root, tests/throwaway_root.py).
# The packaging tests (tests/test_packaging*.py, tests/test_man.py) build the
# .deb (debian/ and stdeb), the .rpm and an apt repository, check them with
# lintian, rpmlint and systemd-analyze (the .deb compiled with Debian's cython3
# and python3-all-dev), build the wheel with Debian's
# setuptools (python3-build), run the autopkgtests, and read the man pages
# with man-db in English and Spanish.
# HAProxy is a real PROXY-protocol front tier for tests/test_e2e_frontdoor.py;
# keepalived runs the two-host pair of tests/test_e2e_keepalived.py.
exec sh "$(dirname "$0")/apt-ensure.sh" iproute2 procps python3-venv \
    build-essential cython3 python3-all-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-build python3-stdeb fakeroot \
    dpkg-dev apt-utils lintian autopkgtest rpm rpmlint groff-base man-db locales systemd keepalived haproxy curl strace
