"""The floor of our stack: the least a server built like mpr-server can do per ``addMessage``.

An Autobahn WebSocket server that parses each frame with orjson, runs one EVALSHA through
txredisapi (HSET of the payload + ZADD of the id, on hash-tagged keys of the connection) and
replies with a message id. No validation, leases, sessions, notifications, timeouts or metrics.
``bench/run.py`` runs it beside mpr-server under the same load: ours / floor is the yardstick.

    python bench/floor.py --port 3199 --redis-port 6379
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
from typing import Any

import orjson
import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, endpoints, task

SCRIPT = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) return 1"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


class FloorProtocol(WebSocketServerProtocol):
    factory: FloorFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as mpr-server does
        super().connectionMade()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        request = orjson.loads(payload)
        params = request["params"]
        cid = params["connectionId"]
        message_id = f"{next(self.factory.ids):024x}"
        d = self.factory.redis.evalsha(
            SHA,
            keys=[f"floor:{{{cid}}}:b", f"floor:{{{cid}}}:p"],
            args=[message_id, orjson.dumps(params["payload"]), self.factory.reactor.seconds()],
        )
        reply_id = request["id"]
        d.addCallback(
            lambda _: self.sendMessage(
                orjson.dumps({"jsonrpc": "2.0", "result": {"messageId": message_id}, "id": reply_id})
            )
        )


class FloorFactory(WebSocketServerFactory):
    protocol = FloorProtocol  # type: ignore[assignment]

    def __init__(self, reactor: Any, redis: Any) -> None:
        super().__init__(reactor=reactor)
        self.reactor = reactor
        self.redis = redis
        self.ids = itertools.count(int.from_bytes(os.urandom(8), "big") << 32)
        self.setProtocolOptions(webStatus=False, perMessageCompressionAccept=lambda offers: None)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    redis = await txredisapi.ConnectionPool(
        "127.0.0.1", args.redis_port, poolsize=4, reconnect=True, convertNumbers=False
    )
    await redis.script_load(SCRIPT)
    await endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1").listen(FloorFactory(reactor, redis))
    print(f"floor serving on {args.port}", flush=True)
    await defer.Deferred()  # until killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3199)
    parser.add_argument("--redis-port", type=int, default=6379)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parser.parse_args())))
