"""SingleRedisClient against a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs

from mpr_server.redis import (
    RedisNotConnected,
    RedisResponseError,
    RedisUnavailable,
    Script,
    SingleRedisClient,
)
from scripts.services.process import free_port
from scripts.services.redis import start_redis
from tests.redis.events import WAIT, Event, Inbox
from tests.services import RedisSingle, start_or_skip


def unique(prefix: str) -> str:
    return f"test:{prefix}:{uuid.uuid4().hex}"


@pytest_twisted.async_yield_fixture
async def client(reactor: Any, redis_single: RedisSingle) -> AsyncIterator[SingleRedisClient]:
    c = SingleRedisClient(reactor, redis_single.url, timeout=3.0, ping_interval=None)
    await c.wait_ready(timeout=WAIT)
    yield c
    await c.close()


@pytest.fixture
def dedicated_redis() -> Any:
    """A redis-server of its own, for tests that stop it."""
    server = start_or_skip("redis-server", start_redis)
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_execute_values_are_not_converted(client: SingleRedisClient) -> None:
    key = unique("exec")
    assert await client.execute(["SET", key, "0123"], key=key) == "OK"
    assert await client.execute(["GET", key], key=key) == "0123"
    assert await client.execute(["SET", key, b"\xff\x00bin"]) == "OK"
    assert await client.execute(["GET", key]) == b"\xff\x00bin"  # not UTF-8: stays bytes
    assert await client.execute(["DEL", key]) == 1
    assert await client.execute(["INCRBY", key, 5]) == 5
    assert await client.execute(["GET", unique("missing")]) is None
    assert await client.execute(["RPUSH", unique("list"), "a", "b"]) == 2
    with pytest.raises(RedisResponseError) as info:
        await client.execute(["LPUSH", key, "x"])
    assert info.value.code == "WRONGTYPE"


@pytest_twisted.ensureDeferred
async def test_bytes_mode(reactor: Any, redis_single: RedisSingle) -> None:
    c = SingleRedisClient(reactor, redis_single.url, decode_responses=False, ping_interval=None)
    try:
        key = unique("bytes")
        assert await c.execute(["SET", key, "v"]) == b"OK"
        assert await c.execute(["GET", key]) == b"v"
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_db_selection(reactor: Any, redis_single: RedisSingle, client: SingleRedisClient) -> None:
    other = SingleRedisClient(reactor, f"redis://{redis_single.host}:{redis_single.port}/5", ping_interval=None)
    try:
        key = unique("db")
        await other.execute(["SET", key, "in-db-5"])
        assert await other.execute(["GET", key]) == "in-db-5"
        assert await client.execute(["GET", key]) is None
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_scripts_fall_back_to_eval_after_script_flush(client: SingleRedisClient) -> None:
    script = Script(f"-- {uuid.uuid4().hex}\nredis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])")
    key = unique("script")
    assert await client.execute(["SCRIPT", "EXISTS", script.sha1]) == [0]
    assert await client.eval_script(script, [key], ["one"]) == "one"  # NOSCRIPT -> EVAL
    assert await client.execute(["SCRIPT", "EXISTS", script.sha1]) == [1]
    assert await client.eval_script(script, [key], ["two"]) == "two"  # EVALSHA
    assert await client.execute(["SCRIPT", "FLUSH"]) == "OK"
    assert await client.eval_script(script, [key], ["three"]) == "three"
    assert await client.execute(["GET", key]) == "three"

    failing = Script("return redis.error_reply('MYERR custom failure')")
    with pytest.raises(RedisResponseError) as info:
        await client.eval_script(failing, [], [])
    assert info.value.code == "MYERR"
    table = Script("return {1, 'two', redis.error_reply('NESTED bad')}")
    reply = await client.eval_script(table, [], [])
    assert reply[:2] == [1, "two"]
    assert isinstance(reply[2], RedisResponseError) and reply[2].code == "NESTED"


@pytest_twisted.ensureDeferred
async def test_get_config(client: SingleRedisClient, redis_single: RedisSingle) -> None:
    assert await client.get_config("maxmemory-policy") == {f"127.0.0.1:{redis_single.port}": "noeviction"}
    assert await client.get_config("no-such-setting") == {f"127.0.0.1:{redis_single.port}": None}


@pytest_twisted.ensureDeferred
async def test_publish_subscribe(reactor: Any, client: SingleRedisClient) -> None:
    inbox = Inbox(reactor)
    channel = unique("chan")
    sub = await client.subscribe(channel, inbox)
    assert await client.publish(channel, "hello") == 1
    assert await inbox.next() == (channel, "hello")
    # sharded is plain pub/sub on a single server
    other = unique("chan")
    sub2 = await client.subscribe(other, inbox, sharded=True)
    assert await client.publish(other, b"\x00\xffbin", sharded=True) == 1
    assert await inbox.next() == (other, b"\x00\xffbin")
    await sub.unsubscribe()
    await sub2.unsubscribe()
    assert await client.publish(channel, "nobody") == 0
    assert inbox.queue.pending == []


@pytest_twisted.ensureDeferred
async def test_failing_callback_does_not_stop_delivery(reactor: Any, client: SingleRedisClient) -> None:
    inbox = Inbox(reactor)
    channel = unique("chan")

    def broken(channel: str, message: Any) -> None:
        raise RuntimeError("callback bug")

    await client.subscribe(channel, broken)
    sub = await client.subscribe(channel, inbox)
    with capturedLogs() as events:
        await client.publish(channel, "1")
        await client.publish(channel, "2")
        assert [await inbox.next(), await inbox.next()] == [(channel, "1"), (channel, "2")]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 2
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["channel"] == channel
    await sub.unsubscribe()


@pytest_twisted.ensureDeferred
async def test_resubscribes_after_the_connection_is_killed(reactor: Any, client: SingleRedisClient) -> None:
    inbox = Inbox(reactor)
    reconnected = Event(reactor)
    channel = unique("chan")
    sub = await client.subscribe(channel, inbox, on_reconnect=reconnected)
    back = reconnected.wait()
    killed = await client.execute(["CLIENT", "KILL", "TYPE", "pubsub"])
    assert killed >= 1
    await back
    assert await client.publish(channel, "after-kill") == 1
    assert await inbox.next() == (channel, "after-kill")
    await sub.unsubscribe()


@pytest_twisted.ensureDeferred
async def test_timeout_when_the_server_does_not_answer(reactor: Any) -> None:
    class Silent(Protocol):
        def dataReceived(self, data: bytes) -> None:
            pass

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    c = SingleRedisClient(reactor, f"redis://127.0.0.1:{port.getHost().port}", ping_interval=None)
    try:
        started = reactor.seconds()
        with pytest.raises(RedisUnavailable, match=r"within 0\.3 s"):
            await c.execute(["PING"], timeout=0.3)
        assert 0.25 < reactor.seconds() - started < 2.0
    finally:
        await c.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nothing_listening(reactor: Any) -> None:
    c = SingleRedisClient(reactor, f"redis://127.0.0.1:{free_port()}", ping_interval=None)
    try:
        with pytest.raises(RedisUnavailable):
            await c.wait_ready(timeout=0.3)
        with pytest.raises(RedisUnavailable):
            await c.execute(["PING"], timeout=0.3)
        with pytest.raises(RedisUnavailable):
            await c.subscribe("x", lambda ch, m: None, timeout=0.3)
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_password(reactor: Any) -> None:
    server = start_or_skip("redis-server", lambda: start_redis(extra_args=["--requirepass", "s3cret"]))
    good = SingleRedisClient(reactor, f"redis://:s3cret@127.0.0.1:{server.port}/2", ping_interval=None)
    bad = SingleRedisClient(reactor, f"redis://:wrong@127.0.0.1:{server.port}", ping_interval=None)
    try:
        assert await good.execute(["PING"]) == "PONG"
        inbox = Inbox(reactor)
        await good.subscribe("pw-chan", inbox)
        await good.publish("pw-chan", "m")
        assert await inbox.next() == ("pw-chan", "m")
        with pytest.raises(RedisUnavailable):
            await bad.execute(["PING"], timeout=1.0)
    finally:
        await good.close()
        await bad.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_unavailable_while_stopped_then_recovers(reactor: Any, dedicated_redis: Any) -> None:
    port = dedicated_redis.port
    c = SingleRedisClient(reactor, f"redis://127.0.0.1:{port}", timeout=2.0, reconnect_max_delay=0.5, pool_size=1)
    inbox = Inbox(reactor)
    reconnected = Event(reactor)
    try:
        await c.execute(["SET", "k", "before"])
        await c.subscribe("events", inbox, on_reconnect=reconnected)
        dedicated_redis.stop(remove_dir=False)

        started = reactor.seconds()
        # the loss may not be noticed before this is sent: it fails with the connection
        with pytest.raises(RedisUnavailable):
            await c.execute(["GET", "k"])
        # from now on calls fail fast, without being sent
        with pytest.raises(RedisNotConnected):
            await c.execute(["GET", "k"])
        assert reactor.seconds() - started < 1.0

        back = reconnected.wait(timeout=10.0)
        restarted = start_redis(port, dir=dedicated_redis.dir)
        try:
            await c.wait_ready(timeout=10.0)
            assert await c.execute(["GET", "k"]) is None  # no persistence: a fresh server
            assert await c.execute(["SET", "k", "after"]) == "OK"
            await back
            assert reconnected.calls == 1
            assert await c.publish("events", "again") == 1
            assert await inbox.next() == ("events", "again")
        finally:
            restarted.stop(remove_dir=False)
    finally:
        await c.close()


def test_tls_requires_rediss(reactor: Any) -> None:
    from mpr_server.redis import TLSOptions

    with pytest.raises(ValueError, match="rediss://"):
        SingleRedisClient(reactor, "redis://127.0.0.1:1", tls=TLSOptions())
