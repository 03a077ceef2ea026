"""The benchmark Events API and worker (benchmarks/events.py): replies held at its gate, echoes, status answers.

The detached-runs benchmark counts on the gate: no reply before it opens,
every held one after, and runs that come later held for the next opening.
"""
import asyncio

import pytest

from benchmarks.events import (
    RUN, RUN_REPLY, STATUS, Broker, Publisher, Worker, open_stream, read_events, serve_connection,
)

pytestmark = pytest.mark.timeout(30)

TOKEN = "bench-token"
QUIET = 0.5  # how long "no reply yet" is watched for


def run_request(n: int, profile: str) -> dict:
    return {"name": RUN, "correlationId": f"run-{n}",
            "payload": {"run_id": f"run_{n}", "owner_account_id": "acct", "profile": profile,
                        "command": [f"nonce-{n}"]}}


async def gate_scenario() -> list:
    """What the reply streams carried, step by step; everything opened here is closed here."""
    broker = Broker([TOKEN])
    server = await asyncio.start_server(lambda r, w: serve_connection(broker, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    worker = Worker(port, TOKEN)
    serving = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 5)
    replies = asyncio.Queue()
    streams = [await open_stream(port, TOKEN, name) for name in (RUN_REPLY, "bus.containers.status.response")]

    async def collect(reader):
        async for envelope in read_events(reader):
            await replies.put(envelope)

    readers = [asyncio.create_task(collect(stream)) for stream in streams]
    publisher = Publisher(port, TOKEN, 1)

    async def quiet() -> bool:
        await asyncio.sleep(QUIET)
        return replies.empty()

    async def next_reply() -> dict:
        return await asyncio.wait_for(replies.get(), 5)

    steps = []
    try:
        await publisher.publish(run_request(1, "gate:30"))
        steps.append(("held", await quiet()))
        worker.release()
        steps.append(("released", await next_reply()))
        await publisher.publish(run_request(2, "gate:30"))
        steps.append(("held again", await quiet()))
        await publisher.publish(run_request(3, "gate:0.2"))
        steps.append(("gate's bound", await next_reply()))
        worker.release()
        steps.append(("released again", await next_reply()))
        await publisher.publish({"name": STATUS, "correlationId": "status-1", "payload": {"owner_account_id": "acct"}})
        steps.append(("status", await next_reply()))
    finally:
        for task in (serving, *readers):
            task.cancel()
        await asyncio.gather(serving, *readers, return_exceptions=True)
        for stream in streams:
            stream.writer.close()
        for pool in (publisher, worker.publisher):
            while not pool.idle.empty():
                pool.idle.get_nowait()[1].close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)  # the server's side of each connection closes too
    return steps


def test_gate_holds_replies_until_released_and_rearms():
    steps = dict(asyncio.run(gate_scenario()))

    assert steps["held"] is True
    first = steps["released"]
    assert first["correlationId"] == "run-1"
    assert first["payload"]["stdout"] == "acct nonce-1"
    assert first["payload"]["args"] == ["nonce-1"]
    # A run that came after the gate opened waits for the next opening, or for its own bound.
    assert steps["held again"] is True
    assert steps["gate's bound"]["correlationId"] == "run-3"
    assert steps["released again"]["correlationId"] == "run-2"
    status = steps["status"]
    assert status["name"] == "bus.containers.status.response"
    assert (status["correlationId"], status["payload"]) == ("status-1", {"items": []})
