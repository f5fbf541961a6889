#!/bin/sh
# Build a flat apt repository in repo/ from the .deb that "make deb" left in
# dist/: repo/Packages(.gz), repo/Release and the package itself.  Prints the
# sources.list line that makes "apt-get update && apt install gbalance" work.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)
# Output directories (the tests use temporary ones).
DIST=${DIST_DIR:-$TOP/dist}
REPO=${REPO_DIR:-$TOP/repo}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gbalance/__init__.py)
DEB="$DIST/gbalance_${VERSION}_$(dpkg-architecture -qDEB_HOST_ARCH).deb"
[ -f "$DEB" ] || { echo "build-apt-repo: $DEB is missing (run make deb)" >&2; exit 1; }
rm -rf "$REPO"
mkdir -p "$REPO"
cp "$DEB" "$REPO"/
cd "$REPO"
apt-ftparchive packages . > Packages
gzip -9nk Packages
# Written beside the repository first, so Release does not list itself.
apt-ftparchive -o APT::FTPArchive::Release::Origin=gbalance \
    -o APT::FTPArchive::Release::Label=gbalance \
    -o APT::FTPArchive::Release::Suite=stable release . > "$REPO.Release.tmp"
mv "$REPO.Release.tmp" Release
echo "deb [trusted=yes] file:$(pwd) ./"
