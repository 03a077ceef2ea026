#!/bin/sh
# Make sure the server binaries the tests run are installed:
#   nginx         for tests/test_deploy.py
#   redis-server  for tests/test_state.py (tests/redisserver.py) and the --state-url tests
#   promtool      for tests/test_metrics_deploy.py (the alert rules); Debian's prometheus package ships it
#
# Usage: tools/ensure-tools.sh [nginx] [redis-server] [promtool]   (no argument: all)
#
# Idempotent: does nothing for a binary that is already there. Otherwise
# installs it from the Debian archive WITHOUT starting or enabling the
# package's system service: the tests run their own server as an
# unprivileged foreground child on 127.0.0.1, and a system nginx on port 80 or
# a system redis on 6379 would be a surprise on a developer machine.
#
# Exit status: 0 when every binary asked for runs afterwards, non-zero with a
# message on stderr otherwise.
set -eu

say() { echo "ensure-tools: $*" >&2; }

# What each tool is: its binary, where else it may live, the Debian packages
# that provide it (first with an install candidate wins), how to ask its
# version, its system service, the pid files that service writes and the
# signal that stops it.
configure() {
    case "$1" in
        nginx)
            BINARY=nginx
            PATHS="/usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx"
            # nginx-light is a real package up to Debian 12 (bookworm) and gone later.
            PACKAGES="nginx-light nginx"
            VERSION_FLAG=-v
            SERVICE=nginx
            PIDFILES="/run/nginx.pid /var/run/nginx.pid"
            STOP_SIGNAL=QUIT
            ;;
        redis-server)
            BINARY=redis-server
            PATHS="/usr/bin/redis-server /usr/sbin/redis-server /usr/local/bin/redis-server"
            PACKAGES="redis-server"
            VERSION_FLAG=--version
            SERVICE=redis-server
            PIDFILES="/run/redis/redis-server.pid /var/run/redis/redis-server.pid"
            STOP_SIGNAL=TERM
            ;;
        promtool)
            BINARY=promtool
            PATHS="/usr/bin/promtool /usr/local/bin/promtool"
            PACKAGES="prometheus"
            VERSION_FLAG=--version
            SERVICE=prometheus
            PIDFILES=""
            STOP_SIGNAL=TERM
            ;;
        *)
            say "unknown tool '$1' (known: nginx, redis-server, promtool)"
            return 1
            ;;
    esac
}

find_binary() {
    command -v "$BINARY" 2>/dev/null && return 0
    for candidate in $PATHS; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

describe() {
    echo "$1 ($("$1" "$VERSION_FLAG" 2>&1 | head -n 1))"
}

[ "$#" -gt 0 ] || set -- nginx redis-server promtool

missing=
for tool in "$@"; do
    configure "$tool"
    if found=$(find_binary); then
        say "$tool already installed: $(describe "$found")"
    else
        missing="$missing $tool"
    fi
done
[ -n "$missing" ] || exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    say "not installed:$missing, and apt-get is not available; install by hand"
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    say "not installed:$missing; run this script as root (it uses apt-get), or install by hand"
    exit 1
fi

# Keep maintainer scripts from starting any service while we install
# (invoke-rc.d and deb-systemd-invoke both honour policy-rc.d exit 101).
# Only install our own policy file when none exists, and always remove ours.
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from tools/ensure-tools.sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    OUR_POLICY=1
fi
cleanup() {
    if [ -n "$OUR_POLICY" ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT INT TERM

say "installing$missing with apt-get"
apt-get update -qq || say "apt-get update failed; trying with the package lists we have"

candidate_of() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'
}

# Belt and braces: the package's own service must stay off and disabled.
# systemctl works offline (without a running systemd) for enable/disable;
# update-rc.d covers sysvinit links. Errors here are not fatal. If a
# maintainer script started the service anyway (no policy honoured), stop the
# instance it started, found by its own pid file, never by process name.
keep_service_off() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable "$SERVICE.service" >/dev/null 2>&1 || true
        if [ -d /run/systemd/system ]; then
            systemctl stop "$SERVICE.service" >/dev/null 2>&1 || true
        fi
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d "$SERVICE" disable >/dev/null 2>&1 || true
    fi
    for pidfile in $PIDFILES; do
        if [ -s "$pidfile" ]; then
            pid=$(cat "$pidfile")
            case "$pid" in
                *[!0-9]*) ;;
                *) kill -"$STOP_SIGNAL" "$pid" 2>/dev/null || true ;;
            esac
        fi
    done
}

failed=
for tool in $missing; do
    configure "$tool"
    installed=
    for package in $PACKAGES; do
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
        say "could not install $tool (tried $PACKAGES); install it by hand and rerun the tests"
        failed="$failed $tool"
        continue
    fi
    keep_service_off
    if found=$(find_binary); then
        say "installed $installed: $(describe "$found")"
    else
        say "installed $installed but no $BINARY binary was found on PATH or in: $PATHS"
        failed="$failed $tool"
    fi
done

[ -z "$failed" ] || exit 1
