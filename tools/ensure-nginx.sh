#!/bin/sh
# Make sure an nginx binary is installed, for tests/test_deploy.py.
#
# Idempotent: does nothing when nginx is already there. Otherwise installs it
# from the Debian archive (nginx-light where the release still has it, else
# nginx) WITHOUT starting or enabling the system nginx service: the tests run
# their own nginx as an unprivileged foreground child on 127.0.0.1, and a
# system nginx grabbing port 80 would be a surprise on a developer machine.
#
# Exit status: 0 when `nginx -v` works afterwards, non-zero with a message
# on stderr otherwise.
set -eu

say() { echo "ensure-nginx: $*" >&2; }

find_nginx() {
    command -v nginx 2>/dev/null && return 0
    for candidate in /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if found=$(find_nginx); then
    say "nginx already installed: $found ($("$found" -v 2>&1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    say "nginx is not installed and apt-get is not available; install nginx by hand"
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    say "nginx is not installed; run this script as root (it uses apt-get), or install nginx by hand"
    exit 1
fi

# Keep maintainer scripts from starting any service while we install
# (invoke-rc.d and deb-systemd-invoke both honour policy-rc.d exit 101).
# Only install our own policy file when none exists, and always remove ours.
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from tools/ensure-nginx.sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    OUR_POLICY=1
fi
cleanup() {
    if [ -n "$OUR_POLICY" ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT INT TERM

say "installing nginx with apt-get"
apt-get update -qq || say "apt-get update failed; trying with the package lists we have"

# nginx-light is a real package up to Debian 12 (bookworm) and gone later;
# ask apt-cache which of the two this release has before installing.
candidate_of() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'
}
installed=
for package in nginx-light nginx; do
    version=$(candidate_of "$package")
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        say "package $package has no install candidate in this release"
        continue
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >&2; then
        installed=$package
        break
    fi
    say "apt-get install $package failed"
done

if [ -z "$installed" ]; then
    say "could not install nginx (tried nginx-light, nginx); install it by hand and rerun the tests"
    exit 1
fi

# Belt and braces: the package's own service must stay off and disabled.
# systemctl works offline (without a running systemd) for enable/disable;
# update-rc.d covers sysvinit links. Errors here are not fatal.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable nginx.service >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl stop nginx.service >/dev/null 2>&1 || true
    fi
fi
if command -v update-rc.d >/dev/null 2>&1; then
    update-rc.d nginx disable >/dev/null 2>&1 || true
fi
# If a maintainer script started nginx anyway (no policy honoured), stop the
# instance it started, found by its own pid file, never by process name.
for pidfile in /run/nginx.pid /var/run/nginx.pid; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        case "$pid" in
            *[!0-9]*) ;;
            *) kill -QUIT "$pid" 2>/dev/null || true ;;
        esac
    fi
done

if found=$(find_nginx); then
    say "installed $installed: $found ($("$found" -v 2>&1))"
    exit 0
fi
say "installed $installed but no nginx binary was found on PATH or in /usr/sbin"
exit 1
