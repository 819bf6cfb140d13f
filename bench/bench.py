"""Load benchmark for a running mpr-server (design §8 workload).

    python bench/bench.py --port 3100 [--sockets 32] [--seconds 10] [--payload 1024]

Phases: addMessage throughput/latency with ``--sockets`` mediator sockets each keeping
``--window`` calls in flight; then a take(10)+remove drain of what was added. Prints one JSON line
per phase. Run it against a server on the same machine; note the machine with the figures.
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


async def main(reactor: Any, args: argparse.Namespace) -> None:
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
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parser.parse_args())))
