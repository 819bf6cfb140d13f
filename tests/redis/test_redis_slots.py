"""Cluster key slots (CRC16/XMODEM with hash tags) and script hashes."""

from __future__ import annotations

import hashlib

import pytest

from mpr_server.redis.script import Script
from mpr_server.redis.slots import SLOT_COUNT, crc16, hash_tag, key_slot


def test_crc16_xmodem_check_value() -> None:
    assert crc16(b"123456789") == 0x31C3 == 12739
    assert crc16(b"") == 0


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        # values from CLUSTER KEYSLOT on Redis 7.0
        ("123456789", 12739),
        ("foo", 12182),
        ("bar", 5061),
        ("somekey", 11058),
        ("{user1000}.following", 3443),
        ("", 0),
        ("foo{}{bar}", 8363),
        ("foo{{bar}}zap", 4015),
        ("clé", 3008),
    ],
)
def test_key_slot_known_values(key: str, slot: int) -> None:
    assert key_slot(key) == slot
    assert key_slot(key.encode()) == slot


def test_hash_tags() -> None:
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    # only the first {...} counts
    assert hash_tag(b"foo{bar}{zap}") == b"bar"
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    # an empty first tag means the whole key is hashed
    assert hash_tag(b"foo{}{bar}") == b"foo{}{bar}"
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % SLOT_COUNT
    # "{" then the first "}" after it
    assert hash_tag(b"foo{{bar}}zap") == b"{bar"
    # no closing brace: whole key
    assert hash_tag(b"foo{bar") == b"foo{bar"
    assert hash_tag(b"}{a}") == b"a"


def test_key_slot_utf8() -> None:
    assert key_slot("clé") == crc16("clé".encode()) % SLOT_COUNT


def test_script_sha1() -> None:
    script = Script("return 1")
    assert script.sha1 == hashlib.sha1(b"return 1").hexdigest()
    assert Script("return 1") == script
