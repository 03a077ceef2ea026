"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`, configured from the environment."""
from bus_containers_provider import create_app

app = create_app()
