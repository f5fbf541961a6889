#!/bin/sh
# Build the gbalance rpm (for this machine's architecture: the per-connection
# modules are compiled with Cython) and its source rpm into dist/ (rpmbuild -ba).
#
# The binary rpm is for current Fedora (42 and later), whose %{_sbindir} is
# /usr/bin (/usr/sbin merged into it): it is built with that layout, so it
# installs there as it is (README, "Packages").  Elsewhere rebuild the
# source rpm (rpmbuild --rebuild), which takes the host's own macros.
#
# Works on Red Hat style hosts and on Debian (package "rpm"): Debian has no
# rpm database of its build dependencies, so they are not checked (--nodeps),
# and the spec gives every Fedora macro it uses a default.  Everything
# happens in a temporary _topdir; the checkout is only read.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
# Output directories (the tests use temporary ones).
DIST=${DIST_DIR:-$TOP/dist}

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gbalance/__init__.py)
SPECV=$(sed -n 's/^Version:[[:space:]]*//p' rpm/gbalance.spec)
if [ -z "$VERSION" ] || [ "$SPECV" != "$VERSION" ]; then
    echo "build-rpm: version drift: gbalance/__init__.py says '$VERSION', rpm/gbalance.spec says '$SPECV'" >&2
    exit 1
fi

# Who built it (the rpm header's Packager; Fedora's spec files carry none):
# the maintainer of debian/control unless $PACKAGER says otherwise.
PACKAGER=${PACKAGER:-$(sed -n 's/^Maintainer:[[:space:]]*//p' debian/control)}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/SOURCES" "$WORK/src/gbalance-$VERSION"
tar -C "$TOP" --exclude=.git --exclude=.venv --exclude=dist --exclude=repo \
    --exclude=rpmbuild --exclude=build --exclude=.pybuild --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=bench/results --exclude=debian --exclude='*.so' \
    -cf - . | tar -C "$WORK/src/gbalance-$VERSION" -xf -
tar -C "$WORK/src" -czf "$WORK/SOURCES/gbalance-$VERSION.tar.gz" "gbalance-$VERSION"
rpmbuild -ba --nodeps --define "_topdir $WORK" --define "_sbindir %{_bindir}" \
    --define "packager $PACKAGER" rpm/gbalance.spec > "$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log" >&2
    echo "build-rpm: rpmbuild failed (log above)" >&2
    exit 1
}
mkdir -p "$DIST"
ARCH=$(rpm --eval '%{_arch}')
cp "$WORK"/RPMS/"$ARCH"/gbalance-"$VERSION"-*."$ARCH".rpm "$WORK"/SRPMS/gbalance-"$VERSION"-*.src.rpm "$DIST"/
ls "$DIST"/gbalance-"$VERSION"-*."$ARCH".rpm "$DIST"/gbalance-"$VERSION"-*.src.rpm
