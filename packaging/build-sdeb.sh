#!/bin/sh
# Build a second, throw-away .deb with stdeb (python3-stdeb), straight from
# setup.py, into dist/sdeb/.  It is only a cross-check of the Python metadata
# (name, version, dependencies): the package to ship is the one from the
# checked-in debian/ ("make deb"), which adds the init script, the systemd
# units, /etc/balance.conf and the man pages.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
DIST=${DIST_DIR:-$TOP/dist}
if ! /usr/bin/python3 -c "import stdeb" 2>/dev/null; then
    echo "build-sdeb: stdeb is missing (apt-get install python3-stdeb)" >&2
    exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Without debian/: stdeb writes its own into deb_dist/.
tar -C "$TOP" --exclude=.git --exclude=.venv --exclude=dist --exclude=repo --exclude=debian \
    --exclude=rpmbuild --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=bench/results -cf - . | tar -C "$WORK" -xf -
(cd "$WORK" && /usr/bin/python3 setup.py --command-packages=stdeb.command \
    sdist_dsc --package3 gbalance --depends3 "python3-gevent, python3-docopt" bdist_deb) \
    > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DIST/sdeb"
cp "$WORK"/deb_dist/*.deb "$DIST/sdeb/"
ls "$DIST"/sdeb/*.deb
