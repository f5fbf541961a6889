#!/bin/sh
# Install the Debian packages the test suite and benchmarks need, if missing.
set -e
# The packaging tests (tests/test_packaging.py, tests/test_man.py) build the
# .deb, the .rpm and an apt repository, check them with lintian, rpmlint and
# systemd-analyze, and read the man pages with man-db in English and Spanish.
PKGS="iproute2 procps python3-venv
      build-essential debhelper dh-python python3-all python3-setuptools fakeroot
      dpkg-dev apt-utils lintian rpm rpmlint groff-base man-db locales systemd"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
