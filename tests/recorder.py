"""A real HTTP/1.1 server on 127.0.0.1 that records each request and answers as a test says."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder(ThreadingHTTPServer):
    """Answers every request with `answer(handler)`; `seen` holds (method, path, headers), `bodies` the bodies.

    Connections are kept alive (HTTP/1.1), and `connections` counts those opened.
    """

    daemon_threads = True

    def __init__(self, answer, tls=None):
        self.answer = answer
        self.seen, self.bodies = [], []
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                server.connections += 1
                super().setup()

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                server.bodies.append(self.rfile.read(length))
                server.seen.append((self.command, self.path, dict(self.headers)))
                server.answer(self)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        # A short poll interval: close() waits for the serving loop to notice, once per test.
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.server_address[1]

    def close(self):
        self.shutdown()
        self.server_close()
