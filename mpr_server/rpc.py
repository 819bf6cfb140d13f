"""JSON-RPC 2.0 as rpc-websockets 7.11.2 speaks it (wire-protocol §2), and the MPR methods (§3).

``Dispatcher.handle_frame`` takes one WebSocket frame and returns the reply frame (or None).
Every failure becomes a JSON-RPC error here, in one place; nothing below the dispatcher knows
about JSON-RPC, and nothing above it knows about messages.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server.metrics import Metrics
from mpr_server.push.model import PushToken
from mpr_server.service import PickupService
from mpr_server.stores.base import QueueFull, StoreUnavailable, TakeQuery

EVENTS = ("messagesReceived",)
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class RpcLimits:
    max_message_bytes: int = 10 * 1024 * 1024
    max_batch: int = 1000
    max_id_length: int = 512
    max_did_length: int = 2048
    call_timeout_s: float = 1.5


@dataclass
class CallContext:
    """What the dispatcher knows of the calling socket."""

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


# -- parameter checks (design §2a) --------------------------------------------------------------


class Params:
    """Typed access to a named-params object; every check names the param it rejects."""

    def __init__(self, raw: Any, limits: RpcLimits) -> None:
        if not isinstance(raw, dict):
            raise RpcError(-32602, "Invalid params", {"details": "params must be an object of named params"})
        self._raw: Mapping[str, Any] = raw
        self._limits = limits

    def _present(self, name: str) -> bool:
        return self._raw.get(name) is not None

    def text(self, name: str, max_length: int | None = None, required: bool = True) -> str | None:
        value = self._raw.get(name)
        if value is None and not required:
            return None
        bound = max_length or self._limits.max_id_length
        if not isinstance(value, str) or not value:
            raise invalid_param(name, "must be a non-empty string")
        if len(value) > bound:
            raise invalid_param(name, f"must be at most {bound} characters")
        return value

    def required_text(self, name: str, max_length: int | None = None) -> str:
        value = self.text(name, max_length)
        assert value is not None
        return value

    def text_list(self, name: str, max_length: int | None = None) -> list[str]:
        value = self._raw.get(name)
        bound = max_length or self._limits.max_id_length
        if not isinstance(value, list):
            raise invalid_param(name, "must be an array of strings")
        for item in value:
            if not isinstance(item, str) or not item:
                raise invalid_param(name, "must contain only non-empty strings")
            if len(item) > bound:
                raise invalid_param(name, f"entries must be at most {bound} characters")
        return value

    def count(self, name: str) -> int:
        value = self._raw.get(name)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid_param(name, "must be a non-negative integer")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise invalid_param(name, "must be a non-negative integer")
        number = int(value)
        if number < 0 or number > MAX_INT:
            raise invalid_param(name, f"must be a non-negative integer up to {MAX_INT}")
        return number

    def flag(self, name: str) -> bool:
        value = self._raw.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise invalid_param(name, "must be a boolean")
        return value

    def payload(self, name: str) -> bytes:
        value = self._raw.get(name)
        if not isinstance(value, dict):
            raise invalid_param(name, "must be a JSON object")
        data = orjson.dumps(value)
        if len(data) > self._limits.max_message_bytes:
            raise invalid_param(name, f"is {len(data)} bytes, over the limit of {self._limits.max_message_bytes} bytes")
        return data

    def push_token(self) -> PushToken | None:
        value = self._raw.get("pushNotificationToken")
        if value is not None:
            if not isinstance(value, dict) or not isinstance(value.get("type"), str):
                raise invalid_param("pushNotificationToken", "must be an object with a string type")
            token = value.get("token")
            if token is not None and not isinstance(token, str):
                raise invalid_param("pushNotificationToken", "token must be a string")
            return PushToken(value["type"], token) if token else None
        legacy = self._raw.get("token")
        if legacy is not None:
            if not isinstance(legacy, str):
                raise invalid_param("token", "must be a string")
            return PushToken("fcm", legacy) if legacy else None
        return None


Handler = Callable[[Any, CallContext], Awaitable[Any]]


class Dispatcher:
    """Frames in, reply frames out."""

    _log = Logger()

    def __init__(
        self,
        service: PickupService,
        clock: IReactorTime,
        limits: RpcLimits = RpcLimits(),
        metrics: Metrics | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics or Metrics()
        self._metrics.describe("mpr_calls_total", "JSON-RPC calls by method and outcome (ok, invalid, error)")
        self._clock = clock
        self._limits = limits
        self._methods: dict[str, Handler] = {
            "__listMethods": self._list_methods,
            "addMessage": self._add_message,
            "takeFromQueue": self._take_from_queue,
            "getAvailableMessageCount": self._get_available_message_count,
            "removeMessages": self._remove_messages,
            "removeAllMessages": self._remove_all_messages,
            "addLiveSession": self._add_live_session,
            "removeLiveSession": self._remove_live_session,
            "getLiveSession": self._get_live_session,
            "ping": self._ping,
        }

    async def handle_frame(self, frame: bytes, ctx: CallContext) -> bytes | None:
        try:
            parsed = orjson.loads(frame)
        except (ValueError, RecursionError) as e:
            return encode({"jsonrpc": "2.0", "error": RpcError(-32700, "Parse error", str(e)).to_json(), "id": None})
        if isinstance(parsed, list):
            if not parsed:
                return encode({"jsonrpc": "2.0", "error": invalid_request("Invalid array").to_json(), "id": None})
            if len(parsed) > self._limits.max_batch:
                error = invalid_request(f"a batch may hold at most {self._limits.max_batch} requests")
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
        try:
            result = await self._call(handler, params, ctx)
        except RpcError as e:
            self._metrics.inc("mpr_calls_total", method=method, outcome="invalid")
            return self._error(e, reply_id) if reply_id is not None else None
        except QueueFull as e:
            self._metrics.inc("mpr_calls_total", method=method, outcome="full")
            return self._error(RpcError(-32001, "Queue full", {"details": str(e)}), reply_id) if reply_id else None
        except (StoreUnavailable, DeferredTimeout) as e:
            self._metrics.inc("mpr_calls_total", method=method, outcome="error")
            details = str(e) if isinstance(e, StoreUnavailable) else "the store did not answer in time"
            self._log.warn("{method} failed: {details}", method=method, details=details)
            return self._internal(details, reply_id)
        except Exception as e:
            self._metrics.inc("mpr_calls_total", method=method, outcome="error")
            self._log.failure("{method} failed", method=method)
            return self._internal(f"{type(e).__name__}: {e}", reply_id)
        self._metrics.inc("mpr_calls_total", method=method, outcome="ok")
        if reply_id is None:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": request_id}

    async def _call(self, handler: Handler, params: Any, ctx: CallContext) -> Any:
        d: Deferred[Any] = Deferred.fromCoroutine(handler(params, ctx))  # type: ignore[arg-type]
        d.addTimeout(self._limits.call_timeout_s, self._clock)
        return await d

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

    # -- methods ---------------------------------------------------------------------------------------

    async def _list_methods(self, params: Any, ctx: CallContext) -> list[str]:
        return list(self._methods)

    async def _ping(self, params: Any, ctx: CallContext) -> str:
        return "pong"

    async def _add_message(self, raw: Any, ctx: CallContext) -> dict[str, str]:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        recipients = p.text_list("recipientDids", self._limits.max_did_length)
        payload = p.payload("payload")
        token = p.push_token()
        message_id = await self._service.add_message(connection_id, recipients, payload, token)
        return {"messageId": message_id}

    async def _take_from_queue(self, raw: Any, ctx: CallContext) -> list[dict[str, object]]:
        p = Params(raw, self._limits)
        query = TakeQuery(
            connection_id=p.required_text("connectionId"),
            recipient_did=p.text("recipientDid", self._limits.max_did_length, required=False),
            limit=p.count("limit"),
            limit_bytes=p.count("limitBytes"),
            delete=p.flag("deleteMessages"),
        )
        messages = await self._service.take(query, ctx.socket_id)
        return [m.to_wire() for m in messages]

    async def _get_available_message_count(self, raw: Any, ctx: CallContext) -> int:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        recipient = p.text("recipientDid", self._limits.max_did_length, required=False)
        return await self._service.count(connection_id, recipient)

    async def _remove_messages(self, raw: Any, ctx: CallContext) -> bool:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        await self._service.remove(connection_id, p.text_list("messageIds"))
        return True

    async def _remove_all_messages(self, raw: Any, ctx: CallContext) -> bool:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        await self._service.remove_all(connection_id, p.required_text("recipientDid", self._limits.max_did_length))
        return True

    async def _add_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        session_id = p.required_text("sessionId")
        try:
            await self._service.add_live_session(connection_id, session_id, ctx.socket_id)
        except StoreUnavailable as e:
            # The original answered false when it could not record the session.
            self._log.warn("addLiveSession failed: {error}", error=str(e))
            return False
        return True

    async def _remove_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = Params(raw, self._limits)
        connection_id = p.required_text("connectionId")
        session_id = p.text("sessionId", required=False)
        return await self._service.remove_live_session(connection_id, ctx.socket_id, session_id)

    async def _get_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = Params(raw, self._limits)
        return await self._service.has_live_session(p.required_text("connectionId"))
