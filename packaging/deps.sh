#!/bin/sh
# Debian packages the test suite needs, installed when missing (`make test`).
# These are build and check tools only: nothing of gbalance is installed on
# the host, and its configuration is not changed (the packaging tests
# install into a throwaway root, tests/throwaway_root.py).
# The packaging tests (tests/test_packaging.py, tests/test_man.py) build the
# .deb, the .rpm and an apt repository, check them with lintian, rpmlint and
# systemd-analyze, and read the man pages with man-db in English and Spanish.
exec sh "$(dirname "$0")/apt-ensure.sh" iproute2 procps python3-venv \
    build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools fakeroot \
    dpkg-dev apt-utils lintian autopkgtest rpm rpmlint groff-base man-db locales systemd
