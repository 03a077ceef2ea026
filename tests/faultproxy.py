"""A fault-injecting TCP proxy on 127.0.0.1, for putting between the provider and the Events API.

Each accepted connection is piped to the upstream port by two threads. Faults
act on the connections open when they are injected, and by default only on
stream connections (the ones whose first bytes are ``GET ``), so publishes
keep working while a stream is broken:

* ``reset_mid_chunk()`` — the next bytes from upstream are cut in half: the
  first half is forwarded, then the client connection is reset (RST).
* ``stall()`` — nothing more is forwarded either way and nothing is closed:
  a half-open connection, which only an idle timeout can notice.
* ``one_byte_writes = True`` — bytes from upstream reach the client one
  ``send`` per byte (every connection, while set).
* ``close_cleanly()`` — what was forwarded stays delivered, then the client
  side is shut down with a FIN.
"""
import socket
import struct
import threading

POLL = 0.05


class _Pipe:
    """One client connection and its upstream connection."""

    def __init__(self, proxy, client, upstream):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.stream = None  # decided from the first request bytes
        self.stalled = False
        self.reset_next = False
        self.closed = threading.Event()

    def start(self):
        for source, target, downstream in ((self.client, self.upstream, False), (self.upstream, self.client, True)):
            threading.Thread(target=self._pump, args=(source, target, downstream), daemon=True).start()

    def _pump(self, source, target, downstream):
        source.settimeout(POLL)
        try:
            while not self.closed.is_set():
                if self.stalled:
                    self.closed.wait(POLL)
                    continue
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if self.stream is None and not downstream:
                    self.stream = data.startswith(b"GET ")
                if self.stalled:
                    continue  # swallowed, the way a dead path loses what is in flight
                if downstream and self.reset_next:
                    target.sendall(data[: max(1, len(data) // 2)])
                    self.reset()
                    break
                if downstream and self.proxy.one_byte_writes:
                    for i in range(len(data)):
                        target.sendall(data[i:i + 1])
                else:
                    target.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def reset(self):
        # SO_LINGER with a zero timeout turns close() into an RST.
        try:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close_cleanly(self):
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close()

    def close(self):
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.close()
            except OSError:
                pass
        self.proxy._forget(self)


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port, host="127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.host = host
        self.one_byte_writes = False
        self._pipes = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"faultproxy-{self.port}", daemon=True)

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._listener.close()
        for pipe in self._victims(streams_only=False):
            pipe.close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept(self):
        self._listener.settimeout(POLL)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # upstream down: the client sees its connection closed
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(self, client, upstream)
            with self._lock:
                self._pipes.add(pipe)
            pipe.start()

    def _forget(self, pipe):
        with self._lock:
            self._pipes.discard(pipe)

    def _victims(self, streams_only=True):
        with self._lock:
            return [p for p in self._pipes if p.stream or not streams_only]

    def open_streams(self):
        return len([p for p in self._victims() if not p.stalled])

    # -- faults ------------------------------------------------------------

    def reset_mid_chunk(self):
        """Cut the next upstream bytes of each open stream in half, then reset it; returns how many."""
        victims = self._victims()
        for pipe in victims:
            pipe.reset_next = True
        return len(victims)

    def stall(self):
        """Stop forwarding on each open stream without closing it; returns how many."""
        victims = self._victims()
        for pipe in victims:
            pipe.stalled = True
        return len(victims)

    def close_cleanly(self):
        """Close each open stream with a FIN; returns how many."""
        victims = self._victims()
        for pipe in victims:
            pipe.close_cleanly()
        return len(victims)
