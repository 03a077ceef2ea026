#!/bin/sh
# Make sure an nginx binary is installed, for tests/test_deploy.py; see ensure-tools.sh.
exec sh "$(dirname "$0")/ensure-tools.sh" nginx
