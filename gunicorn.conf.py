"""gunicorn settings for `gunicorn -c gunicorn.conf.py wsgi:app`, from the environment alone.

The values and hooks are the ones the console script uses, so both serve the same app.
"""
import sys

from bus_containers_provider.config import ConfigError, load_settings
from bus_containers_provider.serving import gunicorn_options

try:
    _settings = load_settings()
except ConfigError as exc:
    print(f"bus-api-provider-containers: error: {exc}", file=sys.stderr)
    sys.exit(2)

# Server socket, worker processes (gthread: one thread per request), and
# the hooks that start and stop each worker's Events listeners after fork.
globals().update(gunicorn_options(_settings))
