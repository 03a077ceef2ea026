"""Slow clients: many connections that each trickle a request head, one byte at a time."""
import contextlib
import socket
import threading

PARTIAL_HEAD = b"GET /readyz HTTP/1.1\r\nHost: provider\r\nX-Slow: "


class _Sockets(list):
    stop = None


@contextlib.contextmanager
def trickling(port: int, count: int, interval: float = 0.2):
    """`count` open connections, each with half a head sent and one more byte every `interval` s.

    Yields the sockets; `sockets.stop()` ends the trickle (before heads are finished by hand).
    """
    sockets = _Sockets()
    stop = threading.Event()
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(PARTIAL_HEAD)
            sockets.append(sock)

        def trickle():
            while not stop.wait(interval):
                for sock in sockets:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        sockets.stop = lambda: (stop.set(), thread.join(timeout=5))
        yield sockets
        stop.set()
        thread.join(timeout=5)
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def finish_and_read(sock, timeout: float = 10.0) -> bytes:
    """Complete a trickled head and read the answer's status line."""
    sock.settimeout(timeout)
    sock.sendall(b"\r\nConnection: close\r\n\r\n")
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def closed_within(sock, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within `timeout` s, reading and discarding any answer."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return True
