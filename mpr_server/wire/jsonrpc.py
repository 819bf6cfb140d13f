"""The JSON-RPC 2.0 envelope as rpc-websockets 7.11.2 speaks it (wire-protocol §2).

``Dispatcher.handle`` takes one WebSocket frame and gives the reply frame (or None): parsing,
batches, notifications (falsy ids), ``rpc.on``/``rpc.off``, ``__listMethods``, the call
deadline, and the mapping of every failure to a JSON-RPC error, in one place. The methods
themselves come as a table (see ``methods.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server._async import Timeouts
from mpr_server.errors import QueueFull, StoreUnavailable
from mpr_server.metrics import CallMetrics, Metrics

EVENTS = ("messagesReceived",)
DEFAULT_MAX_BATCH = 1000


@dataclass
class CallContext:
    """What the dispatcher knows of the calling socket: its id and the events it subscribed to
    (rpc-websockets answers a repeated ``rpc.on`` differently)."""

    socket_id: str
    subscriptions: set[str] = field(default_factory=set)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_request(details: str | None = None) -> RpcError:
    return RpcError(-32600, "Invalid Request", details)


def invalid_param(name: str, reason: str) -> RpcError:
    return RpcError(-32602, "Invalid params", {"param": name, "details": f"{name} {reason}"})


def _truthy(value: Any) -> bool:
    """JavaScript truthiness of a JSON value (rpc-websockets decides notifications by it)."""
    if isinstance(value, (dict, list)):
        return True
    return bool(value)


def encode(reply: Any) -> bytes:
    return orjson.dumps(reply)


Handler = Callable[[Any, CallContext], Coroutine[Any, Any, Any]]


class Dispatcher:
    """Frames in, reply frames out, over a table of methods."""

    _log = Logger()

    def __init__(
        self,
        methods: Mapping[str, Handler],
        clock: IReactorTime,
        *,
        call_timeout_s: float = 1.5,
        max_batch: int = DEFAULT_MAX_BATCH,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._timeouts = Timeouts.of(clock, call_timeout_s)
        self._max_batch = max_batch
        self._methods: dict[str, Handler] = {"__listMethods": self._list_methods, **methods}
        self.metrics = metrics or Metrics()
        self._bound: dict[str, CallMetrics] = {name: self.metrics.for_method(name) for name in self._methods}

    def handle(self, frame: bytes, ctx: CallContext) -> Deferred[bytes | None]:
        """The reply to a frame. Past the call deadline, the call under way is cancelled and
        answered with an error (the stores put their own deadline on each round trip, so this
        is a backstop; one shared timer serves every frame)."""
        d = Deferred.fromCoroutine(self.handle_frame(frame, ctx))
        self._timeouts.watch(d)
        return d

    async def handle_frame(self, frame: bytes, ctx: CallContext) -> bytes | None:
        try:
            parsed = orjson.loads(frame)
        except (ValueError, RecursionError) as e:
            return encode({"jsonrpc": "2.0", "error": RpcError(-32700, "Parse error", str(e)).to_json(), "id": None})
        if isinstance(parsed, list):
            if not parsed:
                return encode({"jsonrpc": "2.0", "error": invalid_request("Invalid array").to_json(), "id": None})
            if len(parsed) > self._max_batch:
                error = invalid_request(f"a batch may hold at most {self._max_batch} requests")
                return encode({"jsonrpc": "2.0", "error": error.to_json(), "id": None})
            replies = []
            for request in parsed:
                reply = await self.run(request, ctx)
                if reply is not None:
                    replies.append(reply)
            return encode(replies) if replies else None
        reply = await self.run(parsed, ctx)
        return None if reply is None else encode(reply)

    async def run(self, request: Any, ctx: CallContext) -> dict[str, Any] | None:
        """One request object → its reply object, or None for a successful notification."""
        if not isinstance(request, dict):
            return self._error(invalid_request(), None)
        request_id = request.get("id")
        reply_id = request_id if _truthy(request_id) else None
        if request.get("jsonrpc") != "2.0":
            return self._error(invalid_request("Invalid JSON RPC version"), reply_id)
        method = request.get("method")
        if not _truthy(method):
            return self._error(RpcError(-32602, "Invalid params", "Method not specified"), reply_id)
        if not isinstance(method, str):
            return self._error(invalid_request("Invalid method name"), reply_id)
        params = request.get("params")
        if params is not None and not isinstance(params, (dict, list)):
            return self._error(invalid_request("params must be an object or an array"), reply_id)
        if method in ("rpc.on", "rpc.off"):
            return self._subscription(method, params, ctx, reply_id)
        handler = self._methods.get(method)
        if handler is None:
            return self._error(RpcError(-32601, "Method not found"), reply_id)
        bound = self._bound[method]
        started = time.perf_counter()
        try:
            result = await handler(params, ctx)
        except RpcError as e:
            bound.seconds.observe(time.perf_counter() - started)
            bound.outcomes["invalid"].inc()
            return self._error(e, reply_id) if reply_id is not None else None
        except QueueFull as e:
            bound.seconds.observe(time.perf_counter() - started)
            bound.outcomes["full"].inc()
            return self._error(RpcError(-32001, "Queue full", {"details": str(e)}), reply_id) if reply_id else None
        except (StoreUnavailable, CancelledError) as e:
            bound.seconds.observe(time.perf_counter() - started)
            bound.outcomes["error" if isinstance(e, StoreUnavailable) else "timeout"].inc()
            details = str(e) if isinstance(e, StoreUnavailable) else "the store did not answer in time"
            self._log.warn("{method} failed: {details}", method=method, details=details)
            return self._internal(details, reply_id)
        except Exception as e:
            bound.seconds.observe(time.perf_counter() - started)
            bound.outcomes["error"].inc()
            self._log.failure("{method} failed", method=method)
            return self._internal(f"{type(e).__name__}: {e}", reply_id)
        bound.seconds.observe(time.perf_counter() - started)
        bound.outcomes["ok"].inc()
        if reply_id is None:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": request_id}

    def _error(self, error: RpcError, reply_id: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "error": error.to_json(), "id": reply_id}

    def _internal(self, details: str, reply_id: Any) -> dict[str, Any] | None:
        if reply_id is None:
            return None
        return self._error(RpcError(500, "Internal server error", {"details": details}), reply_id)

    def _subscription(self, method: str, params: Any, ctx: CallContext, reply_id: Any) -> dict[str, Any]:
        if not isinstance(params, list):
            return self._error(RpcError(-32602, "Invalid params", "event names must be given as an array"), reply_id)
        results: dict[str, str] = {}
        for name in params:
            key = name if isinstance(name, str) else orjson.dumps(name).decode()
            if name not in EVENTS:
                results[key] = "provided event invalid"
            elif method == "rpc.on":
                if name in ctx.subscriptions:
                    results[key] = "socket has already been subscribed to event"
                else:
                    ctx.subscriptions.add(name)
                    results[key] = "ok"
            elif name in ctx.subscriptions:
                ctx.subscriptions.discard(name)
                results[key] = "ok"
            else:
                results[key] = "not subscribed"
        return {"jsonrpc": "2.0", "result": results, "id": reply_id}

    async def _list_methods(self, params: Any, ctx: CallContext) -> list[str]:
        return list(self._methods)
