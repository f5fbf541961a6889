#!/bin/sh
# Debian packages `make bench` needs: the reference proxy (haproxy), the load
# generators (wrk, iperf3) and the short-connection backend (nginx-light).
# Installed with apt-get only when missing; non-root users get the command.
set -e
PKGS="haproxy wrk iperf3 nginx-light util-linux procps"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "bench: missing Debian packages:$missing (sudo apt-get install$missing)" >&2
    exit 1
fi
echo "bench: installing$missing" >&2
apt-get update -qq
# policy-rc.d 101 keeps the packages' init scripts from starting services.
rc=/usr/sbin/policy-rc.d
made_rc=""
if [ ! -e "$rc" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$rc" && chmod 755 "$rc" && made_rc=1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing || status=$?
[ -n "$made_rc" ] && rm -f "$rc"
exit ${status:-0}
