"""Typed decoders of the Lua scripts' replies, one per script (see ``scripts.py`` for the layout
each script returns). Nothing else reads a reply by position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from mpr_server.model import PushToken, SocketRef

# (id, receivedAt, body or None when the body is in MongoDB)
RawMessage = tuple[str, int, bytes | None]


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_list(value: Any) -> list[Any]:
    return orjson.loads(as_bytes(value)) or []


def described(flat: Sequence[Any], start: int = 0) -> list[RawMessage]:
    """The ``describe()`` part of a reply: id, receivedAt, body, ... flattened."""
    return [
        (as_text(flat[i]), int(flat[i + 1]), None if flat[i + 2] is None else as_bytes(flat[i + 2]))
        for i in range(start, len(flat), 3)
    ]


@dataclass(frozen=True)
class Redelivery:
    """Released messages re-leased to the present live session (``redeliver()`` in Lua)."""

    target: SocketRef | None = None
    messages: list[RawMessage] = field(default_factory=list)


def redelivery(flat: Sequence[Any], start: int = 0) -> Redelivery:
    """``[inst, sock, id, receivedAt, body, ...]`` from ``start``, or nothing."""
    if len(flat) <= start:
        return Redelivery()
    return Redelivery(SocketRef(as_text(flat[start]), as_text(flat[start + 1])), described(flat, start + 2))


@dataclass(frozen=True)
class AddReply:
    kind: str  # "d" leased to a live session, "h" session away, "n" no session, "full"
    holder: SocketRef | None = None


def add(reply: Sequence[Any]) -> AddReply:
    kind = as_text(reply[0])
    if kind in ("d", "h"):
        return AddReply(kind, SocketRef(as_text(reply[1]), as_text(reply[2])))
    return AddReply(kind)


@dataclass(frozen=True)
class TakeReply:
    offloaded: list[str]  # taken-and-deleted ids whose MongoDB copy must go too
    messages: list[RawMessage]


def take(reply: Sequence[Any]) -> TakeReply:
    return TakeReply(_json_list(reply[0]), described(reply, 1))


def count(reply: Any) -> int:
    return int(reply)


@dataclass(frozen=True)
class RemoveReply:
    removed: int
    offloaded: list[str]


def remove(reply: Sequence[Any]) -> RemoveReply:
    return RemoveReply(int(reply[0]), _json_list(reply[1]))


def remove_all(reply: Any) -> list[str]:
    """The removed ids whose MongoDB copy must go too."""
    return _json_list(reply)


def leased_messages(reply: Sequence[Any]) -> list[RawMessage]:
    """ADD_SESSION and ATTACH: the messages now leased to the caller's socket."""
    return described(reply)


def flag(reply: Any) -> bool:
    """REMOVE_SESSION, HAS_SESSION, OFFLOAD_DONE, IMPORT: 1 or 0."""
    return bool(int(reply))


@dataclass(frozen=True)
class ReleaseExpiredReply:
    next_lease_end: int | None
    redelivery: Redelivery


def release_expired(reply: Sequence[Any]) -> ReleaseExpiredReply:
    return ReleaseExpiredReply(None if reply[0] is None else int(reply[0]), redelivery(reply, 1))


@dataclass(frozen=True)
class ReleaseHolderReply:
    dropped: bool  # the holder's session of the connection is gone
    held_push: tuple[PushToken, str] | None  # the push held back while it was away (token, message id)
    next_lease_end: int | None
    redelivery: Redelivery


def release_holder(reply: Sequence[Any]) -> ReleaseHolderReply:
    held = None
    if reply[1] is not None:
        push = orjson.loads(as_bytes(reply[1]))
        held = (PushToken(push["type"], push["token"]), push["id"])
    return ReleaseHolderReply(
        bool(int(reply[0])), held, None if reply[2] is None else int(reply[2]), redelivery(reply, 3)
    )


@dataclass(frozen=True)
class OffloadRead:
    seq: int
    received_at_ms: int
    recipient_dids: list[str]
    body: bytes


def offload_read(reply: Sequence[Any]) -> OffloadRead | None:
    if not reply:
        return None
    seq, received_at, _size, dids = orjson.loads(as_bytes(reply[0]))
    return OffloadRead(int(seq), int(received_at), list(dids), as_bytes(reply[1]))
