"""A real redis-server for tests: on a free 127.0.0.1 port, stoppable and restartable.

    with RedisServer() as server:      # or server = RedisServer().start() ... server.stop()
        env(BUS_CONTAINERS_STATE_URL=server.url)
        server.stop(); server.start()  # the store goes down and comes back on the same port, empty
        server.pause(); server.resume()  # it hangs (accepts connections, answers nothing)

    RedisServer(appendonly=True)       # the store a deployment is expected to run (CONTRACT §7):
        server.restart()               # an append-only file in its data dir, so keys survive a restart

Without `appendonly` nothing is written to disk, so a restart loses every key.

The binary comes from the Debian package redis-server (tools/ensure-tools.sh).
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def redis_server_binary():
    """The redis-server path, or None when it is not installed."""
    return shutil.which("redis-server") or next(
        (path for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(path, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(port: int, *words: str, timeout: float = 1.0) -> bytes:
    """Send one inline command to 127.0.0.1:port and return the first reply line (raises OSError)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(" ".join(words).encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.strip()


class RedisServer:
    """One redis-server child process; the port stays the same across stop() and start()."""

    def __init__(self, port=None, appendonly=False, appendfsync="always"):
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed: run tools/ensure-tools.sh (as root) first")
        self.binary = binary
        self.port = port
        self._fixed_port = port is not None
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.dir = None
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="redis-test-")
        # A port picked free can be taken by someone else before redis binds it: pick again,
        # unless the port is fixed (a restart must come back where clients expect it).
        for _ in range(1 if self._fixed_port else 3):
            if not self._fixed_port:
                self.port = free_port()
            if self._spawn():
                self._fixed_port = True
                return self
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}: {self._log_tail()}")

    def _spawn(self) -> bool:
        # No RDB snapshots either way: with appendonly the AOF alone is what a restart reads back.
        persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendonly \
            else ["--appendonly", "no"]
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        try:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", self.dir, "--daemonize", "no", "--logfile", ""],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            try:
                # PING answers -LOADING while an append-only file is read back: not up yet.
                if command(self.port, "PING") == b"+PONG":
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        self._kill()
        return False

    def stop(self):
        """Stop the server (SIGTERM, so an append-only file is flushed); start() brings it back on the same port.

        It comes back empty, or with its keys when it runs with `appendonly`.
        """
        if self.process is None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
        self.process = None

    def restart(self, down=0.0):
        """Stop, stay down `down` seconds, start again on the same port and data dir."""
        self.stop()
        time.sleep(down)
        return self.start()

    def pause(self):
        """Freeze the server: connections are still accepted by the kernel, nothing is answered."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def flush(self):
        """Forget every key (for a server shared by several tests)."""
        assert command(self.port, "FLUSHALL") == b"+OK"

    def close(self):
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _kill(self):
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)
        self.process = None

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as log:
                return log.read()[-500:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
