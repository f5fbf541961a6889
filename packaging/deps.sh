#!/bin/sh
# Debian packages the test suite needs, installed when missing (`make test`).
# The packaging tests (tests/test_packaging.py, tests/test_man.py) build the
# .deb, the .rpm and an apt repository, check them with lintian, rpmlint and
# systemd-analyze, and read the man pages with man-db in English and Spanish.
# HAProxy is a real PROXY-protocol front tier for tests/test_e2e_frontdoor.py.
exec sh "$(dirname "$0")/apt-ensure.sh" iproute2 procps python3-venv \
    build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools fakeroot \
    dpkg-dev apt-utils lintian rpm rpmlint groff-base man-db locales systemd
