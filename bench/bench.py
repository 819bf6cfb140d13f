"""Load benchmark for a running mpr-server (the workload of README.rst, Performance).

    python bench/bench.py --port 3100 [--sockets 32] [--seconds 10] [--payload 1024]

Phases: addMessage throughput/latency with ``--sockets`` mediator sockets each keeping
``--window`` calls in flight; then a take(10)+remove drain of what was added.
With ``--notify-port``, instead: live-notification latency from an instance (``--port``) to
another at ``--rate`` adds/s, acknowledging every delivery. Prints one JSON line per phase.
Run it against a server on the same machine; note the machine with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

import orjson
from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.wsclient import RpcClient


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def add_phase(
    reactor: Any, clients: list[RpcClient], args: argparse.Namespace, connections: list[str]
) -> dict[str, Any]:
    payload = {"protected": "eyJ" + "a" * 40, "iv": "b" * 16, "ciphertext": "c" * args.payload, "tag": "d" * 22}
    latencies: list[float] = []
    deadline = time.perf_counter() + args.seconds
    done = 0

    async def worker(client: RpcClient, n: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            cid = connections[(n + i) % len(connections)]
            i += 1
            started = time.perf_counter()
            await client.call(
                "addMessage", {"connectionId": cid, "recipientDids": ["did:key:z6Mk"], "payload": payload}
            )
            latencies.append(time.perf_counter() - started)
            done += 1

    started = time.perf_counter()
    await defer.gatherResults(
        [
            defer.Deferred.fromCoroutine(worker(c, i * args.window + w))
            for i, c in enumerate(clients)
            for w in range(args.window)
        ]
    )
    elapsed = time.perf_counter() - started
    return {
        "phase": "addMessage",
        "calls": done,
        "per_second": round(done / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


async def drain_phase(clients: list[RpcClient], connections: list[str]) -> dict[str, Any]:
    latencies: list[float] = []
    drained = 0

    async def worker(client: RpcClient, cid: str) -> None:
        nonlocal drained
        while True:
            started = time.perf_counter()
            messages = await client.call("takeFromQueue", {"connectionId": cid, "limit": 10})
            if not messages:
                return
            await client.call("removeMessages", {"connectionId": cid, "messageIds": [m["id"] for m in messages]})
            latencies.append(time.perf_counter() - started)
            drained += len(messages)

    started = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(clients[i % len(clients)], cid)) for i, cid in enumerate(connections)]
    )
    elapsed = time.perf_counter() - started
    return {
        "phase": "take10+remove",
        "messages": drained,
        "messages_per_second": round(drained / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


async def notify_phase(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Adds at a fixed rate on one instance (``--port``) for connections whose live sessions are
    held on another (``--notify-port``); latency from send to ``messagesReceived``, with acks."""
    run = uuid.uuid4().hex[:8]
    receiver = await RpcClient.connect(reactor, args.notify_port, path=f"/?socket_id=notify-{run}", host=args.host)
    sender = await RpcClient.connect(reactor, args.port, path=f"/?socket_id=send-{run}", host=args.host)
    connections = [f"notify-{run}-{i}" for i in range(32)]
    for cid in connections:
        await receiver.call("addLiveSession", {"connectionId": cid, "sessionId": "s"})
    latencies: list[float] = []
    total = int(args.rate * args.seconds)
    finished: defer.Deferred[None] = defer.Deferred()

    def on_notification(message: dict[str, Any]) -> None:
        params = message["params"]
        now = time.perf_counter()
        for m in params["messages"]:
            latencies.append(now - m["encryptedMessage"]["t"])
        receiver.notifications.get().addCallback(on_notification)
        defer.Deferred.fromCoroutine(
            receiver.call(
                "removeMessages",
                {"connectionId": params["connectionId"], "messageIds": [m["id"] for m in params["messages"]]},
            )
        )
        if len(latencies) >= total and not finished.called:
            finished.callback(None)

    receiver.notifications.get().addCallback(on_notification)
    sent = 0

    def tick() -> None:
        nonlocal sent
        for _ in range(max(1, int(args.rate / 100))):
            if sent >= total:
                return
            cid = connections[sent % len(connections)]
            sent += 1
            payload = {"t": time.perf_counter(), "ciphertext": "c" * args.payload}
            defer.Deferred.fromCoroutine(
                sender.call("addMessage", {"connectionId": cid, "recipientDids": ["did:key:z6Mk"], "payload": payload})
            )

    loop = task.LoopingCall(tick)
    loop.clock = reactor
    loop.start(0.01)
    finished.addTimeout(args.seconds + 30, reactor)
    await finished
    loop.stop()
    return {
        "phase": "notify A->B",
        "rate": args.rate,
        "delivered": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


async def main(reactor: Any, args: argparse.Namespace) -> None:
    if args.notify_port:
        print(orjson.dumps(await notify_phase(reactor, args)).decode(), flush=True)
        return
    clients = [
        await RpcClient.connect(reactor, args.port, path=f"/?socket_id=bench-{i}", host=args.host)
        for i in range(args.sockets)
    ]
    run = uuid.uuid4().hex[:8]
    connections = [f"bench-{run}-{i}" for i in range(args.connections)]
    print(orjson.dumps(await add_phase(reactor, clients, args, connections)).decode(), flush=True)
    print(orjson.dumps(await drain_phase(clients, connections)).decode(), flush=True)
    for client in clients:
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--sockets", type=int, default=32)
    parser.add_argument("--window", type=int, default=4, help="calls in flight per socket")
    parser.add_argument("--connections", type=int, default=256, help="DIDComm connections to spread adds over")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--payload", type=int, default=1024, help="ciphertext bytes per message")
    parser.add_argument("--notify-port", type=int, default=0, help="measure live notification to this instance")
    parser.add_argument("--rate", type=float, default=1000.0, help="adds per second in the notify phase")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parser.parse_args())))
