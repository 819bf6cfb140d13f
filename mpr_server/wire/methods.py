"""The MPR methods of wire-protocol §3: their params, checked as docs/protocol.rst says, and the call
into the domain. ``MprMethods.table()`` is what the dispatcher serves."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from twisted.logger import Logger

from mpr_server.errors import StoreUnavailable
from mpr_server.model import PushToken, TakeQuery
from mpr_server.service import PickupService
from mpr_server.wire.frames import message_json
from mpr_server.wire.jsonrpc import CallContext, Handler, RpcError, invalid_param

MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class ParamLimits:
    max_message_bytes: int = 10 * 1024 * 1024
    max_id_length: int = 512
    max_did_length: int = 2048


class Params:
    """Typed access to a named-params object; every check names the param it rejects."""

    def __init__(self, raw: Any, limits: ParamLimits) -> None:
        if not isinstance(raw, dict):
            raise RpcError(-32602, "Invalid params", {"details": "params must be an object of named params"})
        self._raw: Mapping[str, Any] = raw
        self._limits = limits

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


class MprMethods:
    """Each method: check the params, call the domain, shape the result for the wire."""

    _log = Logger()

    def __init__(self, service: PickupService, limits: ParamLimits = ParamLimits()) -> None:
        self._service = service
        self._limits = limits

    def table(self) -> dict[str, Handler]:
        return {
            "addMessage": self.add_message,
            "takeFromQueue": self.take_from_queue,
            "getAvailableMessageCount": self.get_available_message_count,
            "removeMessages": self.remove_messages,
            "removeAllMessages": self.remove_all_messages,
            "addLiveSession": self.add_live_session,
            "removeLiveSession": self.remove_live_session,
            "getLiveSession": self.get_live_session,
            "ping": self.ping,
        }

    def _params(self, raw: Any) -> Params:
        return Params(raw, self._limits)

    async def ping(self, params: Any, ctx: CallContext) -> str:
        return "pong"

    async def add_message(self, raw: Any, ctx: CallContext) -> dict[str, str]:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        recipients = p.text_list("recipientDids", self._limits.max_did_length)
        payload = p.payload("payload")
        token = p.push_token()
        message_id = await self._service.add_message(connection_id, recipients, payload, token)
        return {"messageId": message_id}

    async def take_from_queue(self, raw: Any, ctx: CallContext) -> list[dict[str, object]]:
        p = self._params(raw)
        query = TakeQuery(
            connection_id=p.required_text("connectionId"),
            recipient_did=p.text("recipientDid", self._limits.max_did_length, required=False),
            limit=p.count("limit"),
            limit_bytes=p.count("limitBytes"),
            delete=p.flag("deleteMessages"),
        )
        messages = await self._service.take(query, ctx.socket_id)
        return [message_json(m) for m in messages]

    async def get_available_message_count(self, raw: Any, ctx: CallContext) -> int:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        recipient = p.text("recipientDid", self._limits.max_did_length, required=False)
        return await self._service.count(connection_id, recipient)

    async def remove_messages(self, raw: Any, ctx: CallContext) -> bool:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        await self._service.remove(connection_id, p.text_list("messageIds"))
        return True

    async def remove_all_messages(self, raw: Any, ctx: CallContext) -> bool:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        await self._service.remove_all(connection_id, p.required_text("recipientDid", self._limits.max_did_length))
        return True

    async def add_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        session_id = p.required_text("sessionId")
        try:
            await self._service.add_live_session(connection_id, session_id, ctx.socket_id)
        except StoreUnavailable as e:
            # The original answered false when it could not record the session.
            self._log.warn("addLiveSession failed: {error}", error=str(e))
            return False
        return True

    async def remove_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = self._params(raw)
        connection_id = p.required_text("connectionId")
        session_id = p.text("sessionId", required=False)
        return await self._service.remove_live_session(connection_id, ctx.socket_id, session_id)

    async def get_live_session(self, raw: Any, ctx: CallContext) -> bool:
        p = self._params(raw)
        return await self._service.has_live_session(p.required_text("connectionId"))
