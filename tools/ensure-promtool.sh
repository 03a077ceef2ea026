#!/bin/sh
# Make sure promtool is installed, for the alert-rule checks in tests/test_metrics_deploy.py.
#
# Idempotent: does nothing when promtool is already there. Otherwise installs
# Debian's prometheus package (which ships promtool) WITHOUT starting or
# enabling the prometheus service it also ships: the tests only run promtool.
#
# Exit status: 0 when `promtool --version` works afterwards, non-zero with a
# message on stderr otherwise.
set -eu

say() { echo "ensure-promtool: $*" >&2; }

if command -v promtool >/dev/null 2>&1; then
    say "promtool already installed: $(command -v promtool)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "promtool is not installed and apt-get is not available; install prometheus by hand"
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    say "promtool is not installed; run this script as root (it uses apt-get), or install prometheus by hand"
    exit 1
fi

# Keep maintainer scripts from starting the service while we install
# (invoke-rc.d and deb-systemd-invoke honour policy-rc.d exit 101).
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from tools/ensure-promtool.sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    OUR_POLICY=1
fi
cleanup() {
    if [ -n "$OUR_POLICY" ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT INT TERM

say "installing prometheus (for promtool) with apt-get"
apt-get update -qq || say "apt-get update failed; trying with the package lists we have"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2; then
    say "apt-get install prometheus failed; install it by hand and rerun the tests"
    exit 1
fi
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable prometheus.service >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl stop prometheus.service >/dev/null 2>&1 || true
    fi
fi
if command -v update-rc.d >/dev/null 2>&1; then
    update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

if command -v promtool >/dev/null 2>&1; then
    say "installed: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi
say "installed prometheus but promtool is not on PATH"
exit 1
