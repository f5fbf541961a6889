#!/bin/sh
# Usage: apt-ensure.sh PACKAGE...
# Install the Debian packages that are missing, with apt-get, as root.  A
# temporary policy-rc.d keeps their services (nginx, haproxy, ...) from
# starting.  Non-root users are told the command to run.
set -e
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)" >&2
    exit 1
fi
echo "installing Debian packages:$missing" >&2
apt-get update -qq
rc=/usr/sbin/policy-rc.d
made_rc=""
if [ ! -e "$rc" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$rc" && chmod 755 "$rc" && made_rc=1
fi
status=0
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing || status=$?
[ -n "$made_rc" ] && rm -f "$rc"
exit $status
