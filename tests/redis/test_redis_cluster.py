"""ClusterRedisClient against a real 3-master Redis Cluster."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.protocols import portforward

from mpr_server.redis import (
    Address,
    ClusterRedisClient,
    RedisResponseError,
    Script,
    SingleRedisClient,
    key_slot,
)
from mpr_server.redis.cluster import parse_cluster_slots
from tests.redis.events import WAIT, Event, Inbox
from tests.services import RedisCluster


@pytest_twisted.async_yield_fixture
async def cluster(reactor: Any, redis_cluster: RedisCluster) -> AsyncIterator[ClusterRedisClient]:
    client = ClusterRedisClient(reactor, [Address(*redis_cluster.nodes[0])], timeout=3.0, ping_interval=None)
    await client.wait_ready(timeout=WAIT)
    yield client
    await client.close()


@pytest_twisted.async_yield_fixture
async def admin(reactor: Any, redis_cluster: RedisCluster) -> AsyncIterator[dict[Address, SingleRedisClient]]:
    """A plain client per node, for commands aimed at one node (no redirects)."""
    clients = {
        Address(h, p): SingleRedisClient(reactor, f"redis://{h}:{p}", ping_interval=None)
        for h, p in redis_cluster.nodes
    }
    yield clients
    for c in clients.values():
        await c.close()


def tag_on(client: ClusterRedisClient, node: Address) -> str:
    """A fresh hash tag whose slot is served by `node`."""
    while True:
        tag = uuid.uuid4().hex[:12]
        if client.node_for_slot(key_slot(tag)) == node:
            return tag


def test_parse_cluster_slots_applies_the_nat_map() -> None:
    reply = [
        [0, 5460, ["10.0.0.1", 7000, "id1"], ["10.0.0.4", 7003, "id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],
        [10923, 16383, ["10.0.0.3", 7002, "id3"]],
    ]
    natmap = {Address("10.0.0.1", 7000): Address("127.0.0.1", 17000)}
    slots = parse_cluster_slots(reply, Address("seed.example", 6379), natmap)
    assert slots[0] == slots[5460] == Address("127.0.0.1", 17000)
    assert slots[5461] == slots[10922] == Address("seed.example", 7001)  # "" = the node asked
    assert slots[16383] == Address("10.0.0.3", 7002)


@pytest_twisted.ensureDeferred
async def test_keys_spread_over_all_masters(cluster: ClusterRedisClient, redis_cluster: RedisCluster) -> None:
    assert sorted(cluster.masters) == sorted(Address(h, p) for h, p in redis_cluster.nodes)
    prefix = uuid.uuid4().hex
    keys = [f"spread:{prefix}:{i}" for i in range(60)]
    for i, key in enumerate(keys):
        assert await cluster.execute(["SET", key, str(i)], key=key) == "OK"
    for i, key in enumerate(keys):
        assert await cluster.execute(["GET", key], key=key) == str(i)
    # our slot is the server's slot
    for key in keys[:10]:
        assert await cluster.execute(["CLUSTER", "KEYSLOT", key]) == key_slot(key)
    counts = await cluster.execute_on_all_nodes(["DBSIZE"])
    assert len(counts) == 3 and all(n > 0 for n in counts.values())
    assert await cluster.get_config("maxmemory-policy") == {str(a): "noeviction" for a in cluster.masters}


@pytest_twisted.ensureDeferred
async def test_scripts_on_hash_tagged_keys_on_every_master(cluster: ClusterRedisClient) -> None:
    script = Script(
        f"-- {uuid.uuid4().hex}\n"
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]);"
        "return redis.call('MGET', KEYS[1], KEYS[2])"
    )
    tags = [tag_on(cluster, node) for node in cluster.masters]
    for tag in tags:
        keys = [f"{{{tag}}}:a", f"{{{tag}}}:b"]
        assert await cluster.eval_script(script, keys, [tag]) == [tag, tag]
    await cluster.execute_on_all_nodes(["SCRIPT", "FLUSH"])
    assert await cluster.execute_on_all_nodes(["SCRIPT", "EXISTS", script.sha1]) == {
        str(a): [0] for a in cluster.masters
    }
    for tag in tags:
        assert await cluster.eval_script(script, [f"{{{tag}}}:a", f"{{{tag}}}:b"], ["again"]) == ["again"] * 2
    assert await cluster.execute_on_all_nodes(["SCRIPT", "EXISTS", script.sha1]) == {
        str(a): [1] for a in cluster.masters
    }
    with pytest.raises(RedisResponseError) as info:
        await cluster.eval_script(script, [f"{{{tags[0]}}}:a", f"{{{tags[1]}}}:a"], ["x"])
    assert info.value.code == "CROSSSLOT"


@pytest_twisted.ensureDeferred
async def test_pubsub_classic_and_sharded(reactor: Any, cluster: ClusterRedisClient) -> None:
    inbox = Inbox(reactor)
    # classic pub/sub is broadcast over the whole cluster
    channel = f"classic:{uuid.uuid4().hex}"
    sub = await cluster.subscribe(channel, inbox)
    await cluster.publish(channel, "hello")
    assert await inbox.next() == (channel, "hello")
    await sub.unsubscribe()
    # one sharded channel on each master
    channels = [f"instance:{{{tag_on(cluster, node)}}}" for node in cluster.masters]
    subs = [await cluster.subscribe(c, inbox, sharded=True) for c in channels]
    for c in channels:
        assert await cluster.publish(c, f"to {c}", sharded=True) == 1
        assert await inbox.next() == (c, f"to {c}")
    for s in subs:
        await s.unsubscribe()
    assert await cluster.publish(channels[0], "nobody", sharded=True) == 0


async def migrate_slot(
    admin: dict[Address, SingleRedisClient], slot: int, source: Address, target: Address, keys: list[str]
) -> None:
    """Move a slot the way redis-cli --cluster reshard does (the caller may act in between)."""
    source_id = await admin[source].execute(["CLUSTER", "MYID"])
    target_id = await admin[target].execute(["CLUSTER", "MYID"])
    await admin[target].execute(["CLUSTER", "SETSLOT", slot, "IMPORTING", source_id])
    await admin[source].execute(["CLUSTER", "SETSLOT", slot, "MIGRATING", target_id])
    if keys:
        await admin[source].execute(["MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys])
    await admin[target].execute(["CLUSTER", "SETSLOT", slot, "NODE", target_id])
    for address, node in admin.items():
        if address != target:
            await node.execute(["CLUSTER", "SETSLOT", slot, "NODE", target_id])


@pytest_twisted.ensureDeferred
async def test_ask_during_migration_and_moved_after_it(
    reactor: Any, cluster: ClusterRedisClient, admin: dict[Address, SingleRedisClient]
) -> None:
    source, target = cluster.masters[0], cluster.masters[1]
    tag = tag_on(cluster, source)
    slot = key_slot(tag)
    old_key, new_key = f"{{{tag}}}:old", f"{{{tag}}}:new"
    await cluster.execute(["SET", old_key, "old"], key=old_key)

    # a sharded subscriber on that slot must follow it to the new node
    inbox, moved = Inbox(reactor), Event(reactor)
    channel = f"instance:{{{tag}}}"
    sub = await cluster.subscribe(channel, inbox, sharded=True, on_reconnect=moved)

    source_id = await admin[source].execute(["CLUSTER", "MYID"])
    target_id = await admin[target].execute(["CLUSTER", "MYID"])
    await admin[target].execute(["CLUSTER", "SETSLOT", slot, "IMPORTING", source_id])
    await admin[source].execute(["CLUSTER", "SETSLOT", slot, "MIGRATING", target_id])

    # ASK: a key the source does not have is served by the target, map unchanged
    assert await cluster.execute(["SET", new_key, "new"], key=new_key) == "OK"
    assert await admin[target].execute(["CLUSTER", "COUNTKEYSINSLOT", slot]) == 1
    assert await admin[source].execute(["CLUSTER", "COUNTKEYSINSLOT", slot]) == 1
    assert await cluster.execute(["GET", new_key], key=new_key) == "new"
    assert await cluster.execute(["GET", old_key], key=old_key) == "old"
    assert cluster.node_for_slot(slot) == source

    # migrate the old key: now it is an ASK too
    await admin[source].execute(["MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", old_key])
    assert await cluster.execute(["GET", old_key], key=old_key) == "old"
    assert cluster.node_for_slot(slot) == source

    back = moved.wait(timeout=10.0)
    await admin[target].execute(["CLUSTER", "SETSLOT", slot, "NODE", target_id])
    for address, node in admin.items():
        if address != target:
            await node.execute(["CLUSTER", "SETSLOT", slot, "NODE", target_id])

    # MOVED: the client learns the new owner and retries there
    assert await cluster.execute(["GET", old_key], key=old_key) == "old"
    assert cluster.node_for_slot(slot) == target
    script = Script("return redis.call('GET', KEYS[1])")
    assert await cluster.eval_script(script, [new_key]) == "new"

    await back
    assert await cluster.publish(channel, "after the move", sharded=True) == 1
    assert await inbox.next() == (channel, "after the move")
    await sub.unsubscribe()

    # and back again with a helper, the client following each MOVED
    await migrate_slot(admin, slot, target, source, [old_key, new_key])
    assert await cluster.execute(["MGET", old_key, new_key], key=old_key) == ["old", "new"]
    assert cluster.node_for_slot(slot) == source


class CountingProxy(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        super().connectionMade()


@pytest_twisted.ensureDeferred
async def test_nat_map_translates_announced_addresses(reactor: Any, redis_cluster: RedisCluster) -> None:
    """The nodes announce 127.0.0.1:<port>; the client reaches them only through
    forwarders on other ports, as through a NAT."""
    listeners, natmap, factories = [], {}, {}
    for host, port in redis_cluster.nodes:
        factory = portforward.ProxyFactory(host, port)
        factory.protocol = CountingProxy
        factory.connections = 0  # type: ignore[attr-defined]
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        listeners.append(listener)
        reachable = Address("127.0.0.1", listener.getHost().port)
        natmap[Address(host, port)] = reachable
        factories[reachable] = factory
    seed = natmap[Address(*redis_cluster.nodes[0])]
    client = ClusterRedisClient(reactor, [seed], natmap=natmap, timeout=3.0, ping_interval=None)
    try:
        await client.wait_ready(timeout=WAIT)
        assert sorted(client.masters) == sorted(natmap.values())
        for node in client.masters:
            key = f"{{{tag_on(client, node)}}}:nat"
            assert await client.execute(["SET", key, "via-nat"], key=key) == "OK"
            assert await client.execute(["GET", key], key=key) == "via-nat"
        assert all(f.connections > 0 for f in factories.values())  # type: ignore[attr-defined]
        # a redirect names the announced address; the client follows it through the map
        node0, node1 = client.masters[0], client.masters[1]
        key = f"{{{tag_on(client, node0)}}}:nat"
        await client.execute(["SET", key, "via-nat"], key=key)
        client._slots[key_slot(key)] = node1  # a stale map entry: node1 answers MOVED
        assert await client.execute(["GET", key], key=key) == "via-nat"
        assert client.node_for_slot(key_slot(key)) == node0
    finally:
        await client.close()
        for listener in listeners:
            await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_both_clients_implement_the_interface(reactor: Any) -> None:
    from mpr_server.redis import RedisClient, client_from_settings

    single = client_from_settings(reactor, url="redis://127.0.0.1:1")
    cluster = client_from_settings(reactor, cluster_nodes=[Address("127.0.0.1", 1)])
    clients: list[RedisClient] = [single, cluster]  # checked by mypy
    assert isinstance(clients[0], SingleRedisClient) and isinstance(clients[1], ClusterRedisClient)
    for c in clients:
        await c.close()
