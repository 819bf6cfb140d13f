"""build_push_service: missing or broken credentials disable a provider with a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mpr_server.push import MemoryThrottle, PushService, PushSettings, PushToken, build_push_service


def warnings(events: Any) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_missing_files_disable_providers_with_warnings(reactor: Any, tmp_path: Path) -> None:
    settings = PushSettings(
        firebase_cfg_file=str(tmp_path / "nope" / "firebase.json"),
        apns_cfg_file=str(tmp_path / "apns.json"),
        apns_path_key=str(tmp_path / "AuthKey.p8"),
        apns_topic="org.example",
    )

    with capturedLogs() as events:
        service = build_push_service(settings, reactor, MemoryThrottle(task.Clock()))
        service.startService()
        fcm = await service.push_and_wait(PushToken("fcm", "t"), "m")
        apns = await service.push_and_wait(PushToken("apns", "t"), "m")
        service.push(PushToken("fcm", "t2"), "m")
    await service.stopService()

    texts = warnings(events)
    assert any(str(tmp_path / "nope" / "firebase.json") in t and "FCM" in t for t in texts)
    assert any(str(tmp_path / "apns.json") in t and "APNs" in t for t in texts)
    assert (fcm, apns) == ("disabled", "disabled")
    assert service.counters[("fcm", "disabled")] == 2
    assert service.counters[("apns", "disabled")] == 1


def test_unset_and_malformed_files(reactor: Any, tmp_path: Path, apns_files: tuple[str, str]) -> None:
    bad = tmp_path / "firebase.json"
    bad.write_text("{not json")
    bad_key = tmp_path / "bad.p8"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    settings = PushSettings(firebase_cfg_file=str(bad), apns_cfg_file=apns_files[0], apns_path_key=str(bad_key))

    with capturedLogs() as events:
        service = build_push_service(settings, reactor, MemoryThrottle(task.Clock()))

    texts = warnings(events)
    assert any(str(bad) in t and "not valid JSON" in t for t in texts)
    assert any("APNS_TOPIC" in t for t in texts)
    assert isinstance(service, PushService)

    with capturedLogs() as events:
        build_push_service(
            PushSettings(apns_cfg_file=apns_files[0], apns_path_key=str(bad_key), apns_topic="t"),
            reactor,
            MemoryThrottle(task.Clock()),
        )
    texts = warnings(events)
    assert not any("FIREBASE_CFG_FILE" in t for t in texts)  # not configured: said at info level
    assert any("FIREBASE_CFG_FILE is not set" in formatEvent(e) for e in events)
    assert any(str(bad_key) in t for t in texts)

    with capturedLogs() as events:
        build_push_service(PushSettings(apns_cfg_file=apns_files[0]), reactor, MemoryThrottle(task.Clock()))
    assert any("APNS_PATH_KEY" in t for t in warnings(events))  # half-configured: a warning


def test_unreadable_ca_file_disables_push(reactor: Any, tmp_path: Path, firebase_file: str) -> None:
    with capturedLogs() as events:
        service = build_push_service(
            PushSettings(firebase_cfg_file=firebase_file, push_ca_file=str(tmp_path / "missing-ca.pem")),
            reactor,
            MemoryThrottle(task.Clock()),
        )

    assert any("missing-ca.pem" in t for t in warnings(events))
    assert service.push_and_wait(PushToken("fcm", "t"), "m").result == "disabled"


@pytest.mark.parametrize(
    "bad", [{"push_concurrency": 0}, {"push_max_attempts": 0}, {"push_throttle_ms": -1}, {"apns_port": 0}]
)
def test_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PushSettings(**bad)
