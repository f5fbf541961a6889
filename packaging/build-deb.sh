#!/bin/sh
# Build gbalance_<version>_<arch>.deb into dist/ with dpkg-buildpackage.
#
# The per-connection modules are compiled with Debian's cython3 (the package
# is Architecture: any; debian/rules).  GBALANCE_PURE=1 builds with the
# pkg.gbalance.pure profile (never compiled); GBALANCE_COMPILED=1 with
# pkg.gbalance.compiled, which is what the default builds anyway.
#
# The build runs in a temporary copy of the tree, so the checkout (and the
# developer's .venv) stays untouched.  The version is defined once, in
# gbalance/__init__.py; this script refuses to build when debian/changelog,
# rpm/gbalance.spec or the man pages say something else.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
# Output directories (the tests use temporary ones).
DIST=${DIST_DIR:-$TOP/dist}

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gbalance/__init__.py)
[ -n "$VERSION" ] || { echo "build-deb: no __version__ in gbalance/__init__.py" >&2; exit 1; }
drift=""
DEBV=$(dpkg-parsechangelog -l debian/changelog -S Version)
[ "$DEBV" = "$VERSION" ] || drift="$drift debian/changelog=$DEBV"
SPECV=$(sed -n 's/^Version:[[:space:]]*//p' rpm/gbalance.spec)
[ "$SPECV" = "$VERSION" ] || drift="$drift rpm/gbalance.spec=$SPECV"
for m in man/balance.1 man/balance.es.1; do
    grep -q "^\.TH .*\"gbalance $VERSION\"" "$m" || drift="$drift $m"
done
if [ -n "$drift" ]; then
    echo "build-deb: version drift: gbalance/__init__.py says $VERSION, but:$drift" >&2
    exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/gbalance-$VERSION"
mkdir "$SRC"
# The tree as it is (committed or not), without build products and venvs.
tar -C "$TOP" --exclude=.git --exclude=.venv --exclude=dist --exclude=repo \
    --exclude=rpmbuild --exclude=build --exclude=.pybuild --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=bench/results --exclude='*.so' \
    -cf - . | tar -C "$SRC" -xf -
# Debian's own interpreter and tools only: pybuild runs "python3.11" from
# PATH, which must not be a developer's pyenv or venv interpreter.
PROFILE=""
[ "${GBALANCE_PURE:-}" = 1 ] && PROFILE="-Ppkg.gbalance.pure"
[ "${GBALANCE_COMPILED:-}" = 1 ] && PROFILE="-Ppkg.gbalance.compiled"
ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
(cd "$SRC" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b $PROFILE) > "$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
mkdir -p "$DIST"
cp "$WORK"/gbalance_"$VERSION"_"$ARCH".deb "$WORK"/gbalance_"$VERSION"_*.changes "$WORK"/gbalance_"$VERSION"_*.buildinfo "$DIST"/
# The detached debug symbols of the extension modules, which the .changes lists.
for ddeb in "$WORK"/gbalance-dbgsym_"$VERSION"_"$ARCH".*deb; do
    [ -f "$ddeb" ] && cp "$ddeb" "$DIST"/
done
echo "$DIST/gbalance_${VERSION}_$ARCH.deb"
