"""A real Bus Events API and stand-in integration workers, for tests."""

from .responder import REQUEST_NAMES, Responder, close_stream
from .server import EventsServer

__all__ = ["EventsServer", "Responder", "REQUEST_NAMES", "close_stream"]
