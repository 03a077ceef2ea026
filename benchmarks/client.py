"""An asyncio HTTP client, so that thousands of callers cost the benchmark one thread."""
import asyncio
import json
import time
import uuid

from .events import RUN, RUN_REPLY, Publisher, open_stream, read_events

RUNS = "/api/v1/containers/runs"


async def _request(host: str, port: int, method: str, path: str, token: str, body: dict, timeout: float):
    """(status, decoded body, seconds) of one request on its own connection."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        data = json.dumps(body).encode()
        writer.write((f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                      f"Connection: close\r\n\r\n").encode() + data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        payload = json.loads(await asyncio.wait_for(reader.readexactly(length), timeout))
        return status, payload, time.monotonic() - started
    finally:
        writer.close()


async def _runs(url: str, token: str, count: int, profile: str, timeout: float):
    host, port = url.split("://")[1].split(":")
    port = int(port)

    async def one(n):
        marker = f"caller-{n}"
        try:
            status, payload, seconds = await _request(host, port, "POST", RUNS, token,
                                                      {"profile": profile, "args": [marker]}, timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return {"status": type(exc).__name__, "crossed": False, "seconds": None}
        crossed = status == 200 and payload.get("args") != [marker]
        return {"status": status, "crossed": crossed, "seconds": seconds}

    return await asyncio.gather(*(one(n) for n in range(count)))


def post_runs(url: str, token: str, count: int, profile: str = "sleep:5", timeout: float = 60.0) -> dict:
    """`count` runs at once, each on its own connection: statuses, crossed replies, wall time."""
    started = time.monotonic()
    results = asyncio.run(_runs(url, token, count, profile, timeout))
    wall = time.monotonic() - started
    statuses = {}
    for result in results:
        statuses[result["status"]] = statuses.get(result["status"], 0) + 1
    return {"wall": wall, "ok": statuses.get(200, 0), "statuses": statuses,
            "crossed": sum(r["crossed"] for r in results),
            "seconds": [r["seconds"] for r in results if r["seconds"] is not None]}


async def _direct(port: int, token: str, count: int, profile: str, timeout: float):
    """Publish `count` run requests straight to the Events API and wait for every reply."""
    reader = await open_stream(port, token, RUN_REPLY)
    loop = asyncio.get_running_loop()
    waiting = {str(uuid.uuid4()): loop.create_future() for _ in range(count)}
    pending = dict(waiting)

    async def listen():
        async for envelope in read_events(reader):
            future = pending.pop(envelope["correlationId"], None)
            if future is not None:
                future.set_result(envelope)
            if not pending:
                return

    publisher = Publisher(port, token, 32)

    async def one(n, correlation):
        payload = {"run_id": f"run_{n}", "owner_account_id": "bench", "profile": profile, "command": [str(n)]}
        await publisher.publish({"name": RUN, "correlationId": correlation, "payload": payload})

    started = time.monotonic()
    listener = loop.create_task(listen())
    await asyncio.gather(*(one(n, c) for n, c in enumerate(waiting)))
    await asyncio.wait_for(asyncio.gather(*waiting.values()), timeout)
    elapsed = time.monotonic() - started
    listener.cancel()
    reader.writer.close()
    return elapsed


def direct_runs(events_url: str, token: str, count: int, profile: str = "sleep:5", timeout: float = 60.0) -> float:
    """Wall seconds for the Events side alone to turn `count` held runs around."""
    return asyncio.run(_direct(int(events_url.rsplit(":", 1)[1]), token, count, profile, timeout))


class KeepAlive:
    """One kept-alive HTTP/1.1 connection (opened on first use, again after the server closes it)."""

    def __init__(self, url: str, timeout: float = 60.0):
        host, port = url.split("://")[1].split(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.reader = self.writer = None

    async def request(self, method: str, path: str, token: str, body=None, headers=None) -> tuple:
        """(status, headers with lower-case names, decoded body) of one request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                              self.timeout)
        data = b"" if body is None else json.dumps(body).encode()
        extra = dict(headers or {}, **({"Content-Type": "application/json"} if body is not None else {}))
        self.writer.write((f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
                           f"Content-Length: {len(data)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                           + "\r\n").encode() + data)
        try:
            lines = (await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), self.timeout)).decode("latin-1")
            lines = lines.split("\r\n")
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if value:
                    fields[name.strip().lower()] = value.strip()
            size = int(fields.get("content-length", "0"))
            payload = json.loads(await asyncio.wait_for(self.reader.readexactly(size), self.timeout))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split(" ", 2)[1]), fields, payload

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def over_connections(url: str, jobs: list, connections: int, one) -> list:
    """`await one(connection, job)` for every job over `connections` kept-alive connections; results in job order."""
    results = [None] * len(jobs)
    queue = iter(enumerate(jobs))  # shared by the connections: each takes the next job when it is free

    async def serve():
        connection = KeepAlive(url)
        try:
            for n, job in queue:
                results[n] = await one(connection, job)
        finally:
            connection.close()

    await asyncio.gather(*(serve() for _ in range(connections)))
    return results
