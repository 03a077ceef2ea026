"""The /metrics listener: a small process of the gunicorn master's, on the metrics address only.

It inherits the listening socket from the master and answers GET /metrics with
the sum over every worker's files in the multiprocess directory. It defines no
series itself, serves nothing else, and exits when the master is gone.
"""
import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

# The listener exits on its own within this long once the master is gone (even SIGKILLed).
PARENT_POLL_SECONDS = 1.0


def _error(start_response, status: str, error_type: str, message: str, headers=()):
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]


def metrics_app(directory: str):
    """WSGI app: GET /metrics is the sum over every worker's file; anything else is a JSON error."""
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    # Nothing in this process defines a series, so the registry holds only the workers' sums.
    registry = CollectorRegistry(support_collectors_without_names=True)
    multiprocess.MultiProcessCollector(registry, path=directory)
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            return _error(start_response, "404 Not Found", "not_found", "no such route")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", "method_not_allowed", "use GET",
                          [("Allow", "GET, HEAD")])
        return exposition(environ, start_response)

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
