"""A fast, benchmark-only Bus Events API and integration worker, on one asyncio loop.

It speaks the wire format of CONTRACT §5 (POST /api/v1/events; GET
/api/v1/events/stream?name=N&delivery=broadcast|unicast&group=G as chunked
NDJSON) so the provider cannot tell it from the real one, and costs little
enough that a benchmark through it measures the provider, not the harness.
The in-repo server (tests/eventsapi) keeps history, fault controls and a
thread per connection for the tests; this one keeps nothing.

The worker side is a real client of the same server: it reads
bus.containers.run.request on a unicast stream and publishes each reply over
HTTP, at once, after the run's `sleep:SECONDS` profile, or with `gate:SECONDS`
once the worker's gate opens (SIGUSR1 to this process; at most SECONDS). The
reply echoes the run's command as `args` and its owner and command as
`stdout`, so a caller can tell its own result from another's. Status requests
are answered with no items (a provider's run list asks for them).

Run as `python -m benchmarks.events PORT TOKEN...`; it prints "ready" once
listening and its responder is connected.
"""
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

EVENTS = "/api/v1/events"
STREAM = "/api/v1/events/stream"
RUN = "bus.containers.run.request"
RUN_REPLY = "bus.containers.run.response"
STATUS = "bus.containers.status.request"


class Broker:
    """Streams by name: every broadcast stream gets every event; a unicast group gets it once."""

    def __init__(self, tokens):
        self.tokens = frozenset(tokens)
        self.broadcast = {}  # name -> set of writers
        self.groups = {}  # (name, group) -> list of writers
        self.turn = {}
        self.ids = 0

    def publish(self, body: dict) -> str:
        self.ids += 1
        envelope = {"id": str(self.ids), "name": body["name"], "correlationId": body.get("correlationId"),
                    "payload": body.get("payload")}
        if "error" in body:
            envelope["error"] = body["error"]
        data = json.dumps(envelope, separators=(",", ":")).encode() + b"\n"
        chunk = b"%x\r\n%s\r\n" % (len(data), data)
        for writer in self.broadcast.get(envelope["name"], ()):
            writer.write(chunk)
        for (name, _), members in self.groups.items():
            if name == envelope["name"] and members:
                turn = self.turn[(name, _)] = (self.turn.get((name, _), -1) + 1) % len(members)
                members[turn].write(chunk)
        return envelope["id"]


def _response(status: int, body: dict, keep_alive: bool = True) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    reason = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode() + data


async def serve_connection(broker: Broker, reader, writer):
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            scheme, _, token = headers.get("authorization", "").partition(" ")
            url = urlsplit(target)
            if scheme.lower() != "bearer" or token not in broker.tokens:
                writer.write(_response(401, {"error": {"type": "invalid_auth", "message": "bearer required"}}))
            elif method == "POST" and url.path == EVENTS:
                event = json.loads(body)
                writer.write(_response(202, {"accepted": True, "id": broker.publish(event), "name": event["name"]}))
            elif method == "GET" and url.path == STREAM:
                await serve_stream(broker, writer, {k: v[-1] for k, v in parse_qs(url.query).items()}, reader)
                return
            else:
                writer.write(_response(404, {"error": {"type": "not_found", "message": "no such route"}}))
    except (ConnectionError, ValueError, KeyError):
        return
    finally:
        writer.close()


async def serve_stream(broker: Broker, writer, query: dict, reader):
    name = query["name"]
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
                 b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
    if query.get("delivery", "broadcast") == "unicast":
        members = broker.groups.setdefault((name, query.get("group")), [])
    else:
        members = broker.broadcast.setdefault(name, set())
    (members.append if isinstance(members, list) else members.add)(writer)
    try:
        await reader.read()  # until the reader goes away
    finally:
        (members.remove if isinstance(members, list) else members.discard)(writer)


class Worker:
    """The container integration: reads run and status requests on unicast streams, replies over HTTP."""

    CONNECTIONS = 16  # keep-alive publish connections, reused: a burst of replies opens no new ones

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.connected = asyncio.Event()
        self.publisher = Publisher(port, token, self.CONNECTIONS)
        self.answering = set()
        self.gate = asyncio.Event()

    async def run(self):
        streams = {RUN: self.answer, STATUS: self.status}
        opened = []

        async def serve(name, handler):
            reader = await open_stream(self.port, self.token, name, group="bench")
            opened.append(name)
            if len(opened) == len(streams):
                self.connected.set()
            try:
                async for envelope in read_events(reader):
                    # The loop keeps only weak references to tasks: hold each until it is done.
                    task = asyncio.get_running_loop().create_task(handler(envelope))
                    self.answering.add(task)
                    task.add_done_callback(self.answering.discard)
            finally:
                reader.writer.close()

        await asyncio.gather(*(serve(name, handler) for name, handler in streams.items()))

    def release(self):
        """Open the gate for the runs held at it now; runs that come later wait for the next release."""
        gate, self.gate = self.gate, asyncio.Event()
        gate.set()

    async def answer(self, envelope: dict):
        run = envelope["payload"]
        profile = run.get("profile") or ""
        kind, _, seconds = profile.partition(":")
        if kind == "sleep":
            await asyncio.sleep(float(seconds))
        elif kind == "gate":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gate.wait(), float(seconds))
        command = run.get("command", [])
        result = {"run_id": run["run_id"], "owner_account_id": run["owner_account_id"], "runner_name": "bench",
                  "image": run.get("image") or f"profile:{profile}", "args": command,
                  "exit_code": 0, "stdout": " ".join([run["owner_account_id"], *command]), "stderr": "",
                  "duration_ms": 0, "runtime": {"state": "ready", "provider": "bench"}}
        await self.publish({"name": RUN_REPLY, "correlationId": envelope["correlationId"], "payload": result})

    async def status(self, envelope: dict):
        await self.publish({"name": STATUS.replace(".request", ".response"),
                            "correlationId": envelope["correlationId"], "payload": {"items": []}})

    async def publish(self, event: dict):
        await self.publisher.publish(event)


async def open_stream(port: int, token: str, name: str, group: str = None):
    """A reader positioned after the head of a stream of `name`: broadcast, or unicast to `group`."""
    delivery = f"unicast&group={group}" if group else "broadcast"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"GET {STREAM}?name={name}&delivery={delivery} HTTP/1.1\r\nHost: bench\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    reader.writer = writer  # closing it ends the stream
    return reader


async def read_events(reader):
    """The envelopes of a chunked NDJSON stream, one per chunk, as this server writes them."""
    while True:
        size = int((await reader.readline()).strip(), 16)
        yield json.loads(await reader.readexactly(size + 2))


class Publisher:
    """POST /api/v1/events over a bounded pool of keep-alive connections."""

    def __init__(self, port: int, token: str, size: int):
        self.port, self.token = port, token
        self.idle = asyncio.Queue()
        self.opened, self.size = 0, size

    async def publish(self, event: dict):
        if self.idle.empty() and self.opened < self.size:
            self.opened += 1
            connection = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            connection = await self.idle.get()
        reader, writer = connection
        body = json.dumps(event, separators=(",", ":")).encode()
        writer.write((f"POST {EVENTS} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        self.idle.put_nowait(connection)


async def main(port: int, tokens):
    broker = Broker(tokens)
    server = await asyncio.start_server(lambda r, w: serve_connection(broker, r, w), "127.0.0.1", port,
                                        backlog=4096, reuse_address=True)
    # Stopped by the benchmark with SIGTERM: leave at once, whatever is in flight.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, os._exit, 0)
    worker = Worker(port, tokens[0])
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, worker.release)
    task = asyncio.get_running_loop().create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    print("ready", flush=True)
    async with server:
        await asyncio.gather(server.serve_forever(), task)


@contextlib.contextmanager
def events_process(port: int, tokens):
    """This server and worker in their own process (their own GIL); yields the process, its root as `.url`.

    `process.send_signal(signal.SIGUSR1)` opens the worker's gate.
    """
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.events", str(port), *tokens],
                               stdout=subprocess.PIPE, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("the benchmark Events API did not start")
        process.url = f"http://127.0.0.1:{port}"
        yield process
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def fast_events(port: int, tokens):
    """The Events API root of a benchmark server and worker in their own process."""
    with events_process(port, tokens) as process:
        yield process.url


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
