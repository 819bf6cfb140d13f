"""Which connections each local socket holds a live session or leases on: where to look when
the socket goes (Redis has no index from a holder to its connections)."""

from __future__ import annotations

from collections import defaultdict

from mpr_server.model import SocketRef

SESSION_HELD = 2**62  # the "lease end" of a session: until it is removed or its socket goes
PRUNE_INTERVAL_MS = 60_000


class LocalHolders:
    """Connection -> latest lease end, per socket of this instance; ended entries are pruned now
    and then."""

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._held: defaultdict[SocketRef, dict[str, int]] = defaultdict(dict)
        self._next_prune_ms = 0

    def track(self, holder: SocketRef | None, connection_id: str, until_ms: int) -> None:
        if holder is not None and holder.instance == self._instance_id:
            held = self._held[holder]
            if held.get(connection_id, 0) < until_ms:
                held[connection_id] = until_ms

    def track_session(self, holder: SocketRef, connection_id: str) -> None:
        self.track(holder, connection_id, SESSION_HELD)

    def connections(self, holder: SocketRef) -> list[str]:
        return sorted(self._held.get(holder, ()))

    def forget(self, holder: SocketRef, connection_id: str | None = None) -> None:
        """Forget one connection of the holder, or all of them."""
        if connection_id is None:
            self._held.pop(holder, None)
        else:
            self._held.get(holder, {}).pop(connection_id, None)

    def session_connections(self) -> list[tuple[SocketRef, str]]:
        """Every (socket, connection) where a local socket holds the live session."""
        return [
            (holder, connection_id)
            for holder, held in self._held.items()
            for connection_id, until_ms in held.items()
            if until_ms == SESSION_HELD
        ]

    def holds(self, holder: SocketRef) -> dict[str, int]:
        return dict(self._held.get(holder, {}))

    def prune(self, now_ms: int) -> None:
        if now_ms < self._next_prune_ms:
            return
        self._next_prune_ms = now_ms + PRUNE_INTERVAL_MS
        for holder, held in list(self._held.items()):
            for connection_id, until_ms in list(held.items()):
                if until_ms < now_ms:
                    del held[connection_id]
            if not held:
                del self._held[holder]
