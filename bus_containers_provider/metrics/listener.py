"""The /metrics listener: a small process of the gunicorn master's, on the metrics address only.

It inherits the listening socket from the master and answers GET /metrics with
the sum over every worker's files in the multiprocess directory. It defines no
series itself, serves nothing else, and exits when the master is gone.
"""
import argparse
import glob
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

# The listener exits on its own within this long once the master is gone (even SIGKILLed).
PARENT_POLL_SECONDS = 1.0
# A worker's file is created empty and gets its 8-byte header a moment later.
FILE_HEADER_BYTES = 8
SCRAPE_ATTEMPTS = 3

log = logging.getLogger(__name__)


def _written(path: str) -> bool:
    try:
        return os.path.getsize(path) >= FILE_HEADER_BYTES
    except OSError:
        return False  # removed since the listing: its worker died and was marked dead


def _error(start_response, status: str, error_type: str, message: str, headers=()):
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]


def metrics_app(directory: str):
    """WSGI app: GET /metrics is the sum over every worker's file; anything else is a JSON error."""
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    class Collector(multiprocess.MultiProcessCollector):
        """The workers' sums, without a file a starting worker has not written yet."""

        def collect(self):
            return self.merge([f for f in glob.glob(os.path.join(directory, "*.db")) if _written(f)],
                              accumulate=True)

    # Nothing in this process defines a series, so the registry holds only the workers' sums.
    registry = CollectorRegistry(support_collectors_without_names=True)
    Collector(registry, path=directory)
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            return _error(start_response, "404 Not Found", "not_found", "no such route")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", "method_not_allowed", "use GET",
                          [("Allow", "GET, HEAD")])
        for _ in range(SCRAPE_ATTEMPTS):
            try:
                # The files change under the scrape (a worker starting or marked dead): read again.
                return exposition(environ, start_response)
            except (OSError, ValueError, struct.error) as exc:
                reason = exc
        log.warning("a scrape failed %d times (%s)", SCRAPE_ATTEMPTS, reason)
        return _error(start_response, "503 Service Unavailable", "unavailable", "metrics could not be read",
                      [("Retry-After", "1")])

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape never holds up the exit

    def __init__(self, sock: socket.socket, app):
        super().__init__(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = "metrics", sock.getsockname()[1]
        self.setup_environ()
        self.set_app(app)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass  # scrapes every few seconds would drown the request log


def serve(fd: int, directory: str, parent: int) -> None:
    server = _Server(socket.socket(fileno=fd), metrics_app(directory))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    while not stopping.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:
            break
    server.shutdown()
    server.server_close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The provider's /metrics listener (started by the gunicorn master).")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the master")
    parser.add_argument("--directory", required=True, help="the workers' multiprocess directory")
    parser.add_argument("--parent", type=int, required=True, help="the master's pid; exit when it is gone")
    args = parser.parse_args(argv)
    serve(args.fd, args.directory, args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
