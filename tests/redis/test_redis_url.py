"""REDIS_URL, REDIS_NODES and REDIS_NATMAP parsing."""

from __future__ import annotations

import pytest

from mpr_server.redis.url import Address, RedisURL, parse_natmap, parse_nodes, parse_redis_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisURL("localhost")),
        ("redis://127.0.0.1:6380", RedisURL("127.0.0.1", 6380)),
        ("redis://h:6379/0", RedisURL("h", 6379, 0)),
        ("redis://h/15", RedisURL("h", 6379, 15)),
        ("redis://:secret@h:1/2", RedisURL("h", 1, 2, None, "secret")),
        ("redis://user:p%40ss%3Aword@h", RedisURL("h", username="user", password="p@ss:word")),
        ("rediss://h.example.com:6390/1", RedisURL("h.example.com", 6390, 1, tls=True)),
        ("REDIS://H", RedisURL("h")),
        ("redis://[::1]:7000/3", RedisURL("::1", 7000, 3)),
        ("  redis://h/  ", RedisURL("h")),
    ],
)
def test_parse_redis_url(url: str, expected: RedisURL) -> None:
    parsed = parse_redis_url(url)
    assert parsed == expected
    assert parsed.password == expected.password


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "must start with redis:// or rediss://"),
        ("http://h", "must start with redis:// or rediss://"),
        ("unix:///tmp/redis.sock", "must start with redis:// or rediss://"),
        ("redis://", "no host"),
        ("redis://h:0", "port must be a number from 1 to 65535"),
        ("redis://h:65536", "port must be a number from 1 to 65535"),
        ("redis://h:abc", "port must be a number from 1 to 65535"),
        ("redis://h/x", "database must be a non-negative number"),
        ("redis://h/-1", "database must be a non-negative number"),
        ("redis://h?db=1", "query strings"),
        ("redis://user@h", "user name but no password"),
    ],
)
def test_parse_redis_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_password_never_shown() -> None:
    parsed = parse_redis_url("rediss://u:hunter2@h:1/4")
    assert "hunter2" not in repr(parsed)
    assert parsed.redacted() == "rediss://u:***@h:1/4"
    with pytest.raises(ValueError) as info:
        parse_redis_url("redis://u:hunter2@h:99999")
    assert "hunter2" not in str(info.value)


def test_parse_nodes() -> None:
    assert parse_nodes("10.0.0.1:7000, redis-2:7001,[::1]:7002") == (
        Address("10.0.0.1", 7000),
        Address("redis-2", 7001),
        Address("::1", 7002),
    )
    assert str(Address("::1", 7002)) == "[::1]:7002"


@pytest.mark.parametrize("text", ["", " ", "h", "h:", ":1", "h:1,", "h:1,,h:2", "h:70000", "h:1:2"])
def test_parse_nodes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="REDIS_NODES"):
        parse_nodes(text)


def test_parse_natmap() -> None:
    assert parse_natmap("") == {}
    assert parse_natmap("10.0.1.230:30001:203.0.113.73:30001, 10.0.1.231:30002:localhost:7002") == {
        Address("10.0.1.230", 30001): Address("203.0.113.73", 30001),
        Address("10.0.1.231", 30002): Address("localhost", 7002),
    }
    assert parse_natmap("[fd00::1]:7000:127.0.0.1:7100") == {Address("fd00::1", 7000): Address("127.0.0.1", 7100)}


@pytest.mark.parametrize("text", ["a:1:b", "a:1:b:2:c", "a:1:b:x", "a:1:b:2,", "a:1:b:2,a:1:c:3", "a:0:b:2"])
def test_parse_natmap_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="REDIS_NATMAP"):
        parse_natmap(text)
