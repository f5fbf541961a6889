#!/bin/sh
# Build a flat apt repository in repo/ from the .deb that "make deb" left in
# dist/: repo/Packages(.gz), repo/Release and the package itself.  Prints the
# sources.list line that makes "apt-get update && apt install gbalance" work.
set -eu
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gbalance/__init__.py)
DEB="dist/gbalance_${VERSION}_all.deb"
[ -f "$DEB" ] || { echo "build-apt-repo: $DEB is missing (run make deb)" >&2; exit 1; }
rm -rf repo
mkdir repo
cp "$DEB" repo/
cd repo
apt-ftparchive packages . > Packages
gzip -9nk Packages
# Written beside the repository first, so Release does not list itself.
apt-ftparchive -o APT::FTPArchive::Release::Origin=gbalance \
    -o APT::FTPArchive::Release::Label=gbalance \
    -o APT::FTPArchive::Release::Suite=stable release . > ../repo.Release.tmp
mv ../repo.Release.tmp Release
echo "deb [trusted=yes] file:$(pwd) ./"
