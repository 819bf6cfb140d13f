"""Redis Cluster key slots: CRC16 (XMODEM) of the key or of its ``{hash tag}``, mod 16384."""

from __future__ import annotations

import binascii

SLOT_COUNT = 16384


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses."""
    return binascii.crc_hqx(data, 0)


def hash_tag(key: bytes) -> bytes:
    """The part of the key that is hashed: the content of the first ``{...}`` if it is
    non-empty, otherwise the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    """The cluster slot (0..16383) of a key; str keys are hashed as UTF-8."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return crc16(hash_tag(raw)) % SLOT_COUNT
