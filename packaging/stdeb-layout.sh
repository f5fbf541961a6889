#!/bin/sh
# Usage: sh packaging/stdeb-layout.sh PACKAGE-DIR
#
# pybuild's after-install step in the stdeb build (stdeb.cfg sets
# PYBUILD_AFTER_INSTALL): gives the stdeb .deb the command layout of the
# debian/ build (debian/rules): /usr/sbin/balance, the C balance's path, a
# /usr/bin/balance link to it for users, and both man pages.  The boot-time
# helper (balance-instances) goes: this package has no init script or units
# to call it ("make deb" builds the package that has them).
set -eu
src=$(dirname "$0")/..
dest=$1
if [ -f "$dest/usr/bin/balance" ] && [ ! -L "$dest/usr/bin/balance" ]; then
    install -d "$dest/usr/sbin"
    mv "$dest/usr/bin/balance" "$dest/usr/sbin/balance"
    ln -s ../sbin/balance "$dest/usr/bin/balance"
fi
rm -f "$dest/usr/bin/balance-instances"
install -D -m 0644 "$src/man/balance.1" "$dest/usr/share/man/man1/balance.1"
install -D -m 0644 "$src/man/balance.es.1" "$dest/usr/share/man/es/man1/balance.1"
