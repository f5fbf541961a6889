#!/bin/sh
# Build the stdeb .deb (gbalance_<version>-0stdeb1_all.deb) into dist/:
#   python3 setup.py --command-packages=stdeb.command sdist_dsc --dist-dir D bdist_deb
# with stdeb.cfg, Debian's python3-stdeb and Debian's own python3 and
# setuptools.  It runs in a temporary copy of the tree: the checkout, and
# its debian/ in particular, are only read (stdeb writes its own debian/
# into an unpacked copy of the sdist).  The build log is kept next to the
# .deb (gbalance-stdeb-build.log) for the warning check of the tests.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
DIST=${DIST_DIR:-$TOP/dist}

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gbalance/__init__.py)
[ -n "$VERSION" ] || { echo "build-stdeb: no __version__ in gbalance/__init__.py" >&2; exit 1; }
for m in man/balance.1 man/balance.es.1; do
    grep -q "^\.TH .*\"gbalance $VERSION\"" "$m" || {
        echo "build-stdeb: version drift: gbalance/__init__.py says $VERSION, but $m does not" >&2
        exit 1
    }
done
REVISION=$(sed -n 's/^Debian-Version:[[:space:]]*//p' stdeb.cfg)
[ -n "$REVISION" ] || { echo "build-stdeb: no Debian-Version in stdeb.cfg" >&2; exit 1; }
if ! /usr/bin/python3 -c 'import stdeb' 2>/dev/null; then
    echo "build-stdeb: stdeb is missing (as root: apt-get install python3-stdeb)" >&2
    exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
tar -C "$TOP" --exclude=.git --exclude=.venv --exclude=dist --exclude=repo --exclude=deb_dist \
    --exclude=rpmbuild --exclude=build --exclude=.pybuild --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=bench/results -cf - . | tar -C "$WORK/src" -xf -
# Debian's interpreter, setuptools and tools only (not a pyenv or venv python).
# GBALANCE_PURE=1: an _all.deb, so never the optional Cython build.
(cd "$WORK/src" && GBALANCE_PURE=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/bin/python3 setup.py \
    --command-packages=stdeb.command sdist_dsc --dist-dir "$WORK/deb_dist" bdist_deb) > "$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log" >&2
    echo "build-stdeb: stdeb's bdist_deb failed (log above)" >&2
    exit 1
}
mkdir -p "$DIST"
deb=gbalance_${VERSION}-${REVISION}_all.deb
cp "$WORK/deb_dist/$deb" "$DIST/"
cp "$WORK/build.log" "$DIST/gbalance-stdeb-build.log"
echo "$DIST/$deb"
