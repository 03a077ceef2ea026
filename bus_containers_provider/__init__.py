"""bus-api-provider-containers: account-isolated container runs over the Bus Events API."""
from typing import Mapping, Optional, Union

from flask import Flask

from .config import Settings, load_settings

MAX_BODY_BYTES = 1024 * 1024


def create_app(config: Optional[Union[Settings, Mapping[str, str]]] = None) -> Flask:
    """Build the app from Settings, from a mapping of environment variables, or from os.environ.

    Nothing here starts a thread or opens a socket; `start(app)` does, per worker.
    """
    settings = config if isinstance(config, Settings) else load_settings(config)
    # No static files: Flask's default /static/<path> rule would be a route outside every guard.
    app = Flask(__name__, static_folder=None)
    # Every answer is the JSON contract: no automatic OPTIONS page, no HTML slash redirects.
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, PROVIDE_AUTOMATIC_OPTIONS=False)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.json.sort_keys = False

    from . import errors, logs, metrics, openapi, provider
    from .routes import health, runner, runs

    errors.init_app(app)
    logs.init_app(app)
    metrics.init_app(app, settings)
    provider.init_app(app, settings)
    app.register_blueprint(runs.bp)
    app.register_blueprint(runner.bp)
    app.register_blueprint(health.bp)
    openapi.init_app(app)
    return app


def start(app: Flask) -> None:
    """Start the app's background listeners (in a worker, after fork)."""
    from . import metrics

    provider = app.extensions["bus_containers"]
    metrics.switch_on(provider.settings)
    provider.start()


def stop(app: Flask) -> None:
    """Stop the app's background listeners and close their connections."""
    app.extensions["bus_containers"].stop()
