"""A minimal Redis Cluster client (txredisapi has none).

Routing: CRC16 key slots, a slot map from CLUSTER SLOTS (announced addresses
translated by the NAT map), one connection pool per master, MOVED (update the
slot, refresh the map in the background, retry), ASK (ASKING + the command on
one connection, no map change), TRYAGAIN/CLUSTERDOWN (short back-off), map
refresh after a node becomes unreachable, and a bound on redirects per call.
Pub/sub: classic channels on one connection to any master (PUBLISH is broadcast
cluster-wide), sharded channels on a connection to the master owning the slot,
moved when the slot moves or the node goes away.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import Waiters

from .base import ClientBase
from .connection import Arg, ConnectionSettings, TLSOptions, command_name, to_text
from .errors import RedisNotConnected, RedisResponseError, RedisUnavailable
from .pool import NodePool
from .pubsub import Channel, PubSubConnection
from .slots import SLOT_COUNT, key_slot
from .url import Address, parse_address

SlotMap = list[Address | None]


def parse_cluster_slots(reply: Any, asked: Address, natmap: Mapping[Address, Address]) -> SlotMap:
    """Turn a CLUSTER SLOTS reply into slot -> reachable master address.

    An empty host means "the node you asked"; announced addresses are translated
    through the NAT map.
    """
    slots: SlotMap = [None] * SLOT_COUNT
    if not isinstance(reply, list):
        raise RedisResponseError(f"unexpected CLUSTER SLOTS reply: {reply!r}"[:200])
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = to_text(master[0])
        if host in ("", "?"):
            host = asked.host
        announced = Address(host, int(master[1]))
        address = natmap.get(announced, announced)
        for slot in range(start, end + 1):
            slots[slot] = address
    return slots


class ClusterRedisClient(ClientBase):
    """A Redis Cluster client (REDIS_TYPE=cluster, REDIS_NODES, REDIS_NATMAP)."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        nodes: Sequence[Address | str],
        *,
        natmap: Mapping[Address, Address] | None = None,
        password: str | None = None,
        username: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 2.0,
        decode_responses: bool = True,
        max_redirects: int = 5,
        ping_interval: float | None = 15.0,
    ) -> None:
        if not nodes:
            raise ValueError("a Redis Cluster client needs at least one node address")
        settings = ConnectionSettings(
            password=password,
            username=username,
            db=0,
            tls=tls,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            reconnect_max_delay=reconnect_max_delay,
            decode_responses=decode_responses,
            ping_interval=ping_interval,
        )
        super().__init__(reactor, settings, timeout)
        self._seeds = [parse_address(n, "cluster node") if isinstance(n, str) else Address(*n) for n in nodes]
        self._natmap = dict(natmap or {})
        self.max_redirects = max_redirects
        self._slots: SlotMap = [None] * SLOT_COUNT
        self._masters: list[Address] = []
        self._pools: dict[Address, NodePool] = {}
        self._refresh_running = False
        self._refreshed: Waiters[None] = Waiters()
        # pub/sub: where each subscribed channel lives, and a connection per node
        self._homes: dict[Channel, Address] = {}
        self._pubsubs: dict[Address, PubSubConnection] = {}
        self._rehome_scheduled = False
        self._rehome_call: IDelayedCall | None = None
        self._rehome_running: Deferred[None] | None = None

    # -- slot map

    @property
    def masters(self) -> list[Address]:
        """The masters (reachable addresses) of the current slot map."""
        return list(self._masters)

    def node_for_slot(self, slot: int) -> Address | None:
        return self._slots[slot]

    def _nat(self, address: Address) -> Address:
        return self._natmap.get(address, address)

    def _pool(self, address: Address) -> NodePool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = NodePool(self._reactor, address, self._settings)
        return pool

    def refresh_slots(self) -> Deferred[None]:
        """Reload the slot map (one refresh at a time; callers share it). Cancelling
        the returned Deferred does not stop the refresh for the others."""
        waiter = self._refreshed.wait()
        if not self._refresh_running:
            self._refresh_running = True
            Deferred.fromCoroutine(self._run_refresh())
        return waiter

    async def _run_refresh(self) -> None:
        failure: Failure | None = None
        try:
            await self._load_slots()
        except Exception:
            failure = Failure()
        self._refresh_running = False
        if failure is None:
            self._refreshed.fire(None)
        else:
            self._refreshed.fail(failure.value)  # type: ignore[arg-type]

    async def _load_slots(self) -> None:
        candidates = list(dict.fromkeys([*self._masters, *self._seeds]))
        errors: list[str] = []
        for address in candidates:
            try:
                d: Deferred[Any] = Deferred.fromCoroutine(self._pool(address).execute(["CLUSTER", "SLOTS"]))
                d.addTimeout(self.timeout, self._reactor)
                reply = await d
                slots = parse_cluster_slots(reply, address, self._natmap)
            except Exception as e:
                errors.append(f"{address}: {e!r}")
                continue
            self._install(slots)
            return
        raise RedisUnavailable("cannot load the cluster slot map from any node: " + "; ".join(errors))

    def _install(self, slots: SlotMap) -> None:
        old_masters = set(self._masters)
        self._slots = slots
        self._masters = sorted({a for a in slots if a is not None})
        if set(self._masters) != old_masters:
            self._log.info("Redis Cluster masters: {masters}", masters=[str(m) for m in self._masters])
        if None in slots:
            self._log.warn("Redis Cluster slot map has {n} unassigned slots", n=slots.count(None))
        # connections to nodes that hold no slots any more (and are no seeds) go
        keep = set(self._masters) | set(self._seeds)
        for address in [a for a in self._pools if a not in keep]:
            pool = self._pools.pop(address)
            Deferred.fromCoroutine(pool.close()).addErrback(self._log_close_error)

    def _log_close_error(self, failure: Failure) -> None:
        self._log.failure("Closing a Redis connection pool failed", failure)

    def _refresh_in_background(self) -> None:
        self.refresh_slots().addErrback(
            lambda f: self._log.warn("Redis Cluster slot map refresh failed: {error}", error=f.getErrorMessage())
        )

    def _node_for(self, slot: int | None) -> Address:
        if slot is not None:
            address = self._slots[slot]
            if address is not None:
                return address
        candidates = self._masters or self._seeds
        connected = [a for a in candidates if a in self._pools and self._pools[a].connected]
        return random.choice(connected or candidates)

    # -- commands

    async def _execute(self, args: Sequence[Arg], key: str | bytes | None) -> Any:
        return await self._route(args, key, lambda pool, asking: pool.execute(args, asking=asking))

    async def _execute_then(
        self, args: Sequence[Arg], then: Callable[[], Sequence[Arg]], key: str | bytes | None
    ) -> tuple[Any, Any]:
        pair: tuple[Any, Any] = await self._route(
            args, key, lambda pool, asking: pool.execute_then(args, then(), asking=asking)
        )
        return pair

    async def _route(
        self,
        args: Sequence[Arg],
        key: str | bytes | None,
        send: Callable[[NodePool, bool], Coroutine[Any, Any, Any]],
    ) -> Any:
        """Send to the node owning ``key``'s slot, following redirects and failovers."""
        if not self._masters:
            await self.refresh_slots()
        slot = key_slot(key) if key is not None else None
        ask: Address | None = None
        for attempt in range(self.max_redirects + 1):
            address = ask or self._node_for(slot)
            try:
                return await send(self._pool(address), ask is not None)
            except RedisResponseError as e:
                ask = None
                if e.code == "MOVED":
                    moved_slot, target = self._redirect(e)
                    self._slots[moved_slot] = target
                    self._refresh_in_background()
                elif e.code == "ASK":
                    ask = self._redirect(e)[1]
                elif e.code in ("TRYAGAIN", "CLUSTERDOWN"):
                    # a multi-key command during a migration, or a failover in progress
                    await deferLater(self._reactor, min(0.05 * 2**attempt, 0.5), lambda: None)
                    if e.code == "CLUSTERDOWN":
                        await self.refresh_slots()
                else:
                    raise
            except RedisNotConnected:
                # never sent: find the slot's new owner (failover) and try again
                if attempt == self.max_redirects:
                    raise
                ask = None
                await self.refresh_slots()
                if self._node_for(slot) == address:
                    await deferLater(self._reactor, min(0.05 * 2**attempt, 0.5), lambda: None)
            except RedisUnavailable:
                # lost with the command in flight: it may have run, so no retry here;
                # the node may be failing over, so look at the map again
                self._refresh_in_background()
                raise
            except CancelledError:
                # the caller's timeout: a hung or partitioned node keeps its connections
                # open while the cluster fails it over; only a fresh map moves us away
                self._refresh_in_background()
                raise
        raise RedisUnavailable(f"Redis Cluster: too many redirects for {command_name(args)}")

    def _redirect(self, error: RedisResponseError) -> tuple[int, Address]:
        # "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"
        try:
            _, slot, where = error.message.split(" ", 2)
            host, _, port = where.rpartition(":")
            return int(slot), self._nat(Address(host.strip("[]"), int(port)))
        except ValueError:
            raise RedisResponseError(f"malformed redirect: {error.message}") from None

    async def _execute_all(self, args: Sequence[Arg]) -> dict[str, Any]:
        if not self._masters:
            await self.refresh_slots()
        results: dict[str, Any] = {}
        for address in self.masters:
            results[str(address)] = await self._pool(address).execute(args)
        return results

    async def _node_commands(self) -> list[Callable[[Sequence[Arg]], Coroutine[Any, Any, Any]]]:
        if not self._masters:
            await self.refresh_slots()
        return [self._pool(address).execute for address in self.masters]

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self._timed(self._load_and_ping(), timeout, "connect")

    async def _load_and_ping(self) -> None:
        await self.refresh_slots()
        for address in self.masters:
            await self._pool(address).wait_connected()

    # -- pub/sub

    def _home_for(self, channel: str, sharded: bool, current: Address | None) -> Address:
        if sharded:
            return self._node_for(key_slot(channel))
        # classic pub/sub is broadcast: any master will do, keep the current one while it works
        if current is not None and current in self._masters:
            conn = self._pubsubs.get(current)
            if conn is None or conn.connected:
                return current
        alive = [a for a in self._masters if a != current and self._pools.get(a) and self._pools[a].connected]
        return (alive or self._masters or self._seeds)[0]

    def _pubsub_for(self, address: Address) -> PubSubConnection:
        conn = self._pubsubs.get(address)
        if conn is None:
            conn = self._pubsubs[address] = self._new_pubsub(address)
        return conn

    async def _pubsub_subscribe(self, channel: str, sharded: bool) -> None:
        if not self._masters:
            await self.refresh_slots()
        wire = (channel, sharded)
        for _ in range(self.max_redirects + 1):
            address = self._home_for(channel, sharded, self._homes.get(wire))
            try:
                await self._pubsub_for(address).subscribe(channel, sharded)
            except RedisResponseError as e:
                if e.code != "MOVED":
                    raise
                moved_slot, target = self._redirect(e)
                self._slots[moved_slot] = target
                self._refresh_in_background()
                continue
            self._homes[wire] = address
            return
        raise RedisUnavailable(f"Redis Cluster: too many redirects subscribing to {channel}")

    async def _pubsub_unsubscribe(self, channel: str, sharded: bool) -> None:
        address = self._homes.pop((channel, sharded), None)
        conn = self._pubsubs.get(address) if address is not None else None
        if conn is not None:
            await conn.unsubscribe(channel, sharded)
            await self._drop_idle_pubsub(conn)

    async def _drop_idle_pubsub(self, conn: PubSubConnection) -> None:
        if not conn.channels and self._pubsubs.get(conn.address) is conn:
            del self._pubsubs[conn.address]
            await conn.close()

    def _pubsub_lost(self, conn: PubSubConnection) -> None:
        self._schedule_rehome(0.0)

    def _pubsub_channel_lost(self, conn: PubSubConnection, channel: str, sharded: bool) -> None:
        # the server dropped it (its slot moved away): subscribe where it lives now
        if self._homes.get((channel, sharded)) == conn.address:
            del self._homes[(channel, sharded)]
        self._schedule_rehome(0.0)

    def _schedule_rehome(self, delay: float) -> None:
        if self._rehome_scheduled or self._closed:
            return
        self._rehome_scheduled = True

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                self._log.failure("Moving Redis subscriptions failed", failure)

        def run() -> None:
            self._rehome_scheduled = False
            self._rehome_running = Deferred.fromCoroutine(self._rehome())
            self._rehome_running.addErrback(failed)

        self._rehome_call = self._reactor.callLater(delay, run)

    async def _rehome(self) -> None:
        """Put every subscribed channel on the node it belongs to now; channels whose
        node is down stay put (their connection keeps reconnecting) until the map
        says otherwise; retried while any is missing."""
        if self._closed:
            return
        try:
            d = self.refresh_slots()
            d.addTimeout(self.timeout, self._reactor)
            await d
        except Exception as e:
            self._log.warn("Redis Cluster slot map refresh failed: {error}", error=e)
        retry = False
        for wire in sorted(self._subscriptions):
            channel, sharded = wire
            current = self._homes.get(wire)
            want = self._home_for(channel, sharded, current)
            if current == want and self._pubsubs.get(want) and (channel, sharded) in self._pubsubs[want].channels:
                if not self._pubsubs[want].connected:
                    retry = True
                continue
            if current is not None and current in self._pubsubs:
                old = self._pubsubs[current]
                old.forget(channel, sharded)
                if old.connected:
                    await old.unsubscribe(channel, sharded)
                await self._drop_idle_pubsub(old)
            self._homes.pop(wire, None)
            try:
                await self._timed(self._pubsub_subscribe(channel, sharded), None, "SUBSCRIBE")
            except Exception as e:
                self._log.warn("Resubscribing {channel} failed: {error}", channel=channel, error=e)
                retry = True
                continue
            self._log.info(
                "Redis subscription {channel} moved to {address}", channel=channel, address=str(self._homes.get(wire))
            )
            self._reconnected([wire])
        if retry:
            self._schedule_rehome(min(self._settings.reconnect_max_delay, 1.0))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._rehome_call is not None and self._rehome_call.active():
            self._rehome_call.cancel()
        if self._rehome_running is not None and not self._rehome_running.called:
            self._rehome_running.cancel()
        for conn in list(self._pubsubs.values()):
            await conn.close()
        self._pubsubs.clear()
        for pool in list(self._pools.values()):
            await pool.close()
        self._pools.clear()
