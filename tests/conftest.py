"""Shared fixtures: an app per test built by the factory, and tokens for it."""
import pytest

from bus_containers_provider import create_app, start, stop
from bus_containers_provider.auth import mint_token

SECRET = "test-secret-that-is-at-least-32-bytes-long"
PUBLIC = "ai.hg.fi/api"
INTERNAL = "ai.hg.fi/internal"
ALL_PUBLIC_SCOPES = "container:read container:run container:delete"


def env(**extra) -> dict:
    """Environment variables for create_app, with the test secret."""
    return {"BUS_CONTAINERS_JWT_SECRET": SECRET, **extra}


def token(subject="acct-a", scope=ALL_PUBLIC_SCOPES, audience=PUBLIC, **kwargs) -> str:
    return mint_token(SECRET.encode(), subject, scope, audience, **kwargs)


def bearer(subject="acct-a", scope=ALL_PUBLIC_SCOPES, audience=PUBLIC) -> dict:
    return {"Authorization": f"Bearer {token(subject, scope, audience)}"}


@pytest.fixture
def app_env():
    """Override in a module to configure the app differently."""
    return env()


@pytest.fixture
def app(app_env):
    application = create_app(app_env)
    start(application)
    yield application
    stop(application)


@pytest.fixture
def client(app):
    return app.test_client()
