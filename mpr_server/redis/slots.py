"""Redis Cluster key slots: CRC16 (XMODEM) of the key or of its ``{hash tag}``, mod 16384."""

from __future__ import annotations

SLOT_COUNT = 16384


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _make_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


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
