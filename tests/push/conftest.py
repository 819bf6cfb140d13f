"""Fixtures for the push tests: keys, credentials files, fake servers, services torn down after use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.web.server import Site

from mpr_server.push import MemoryThrottle, PushService, PushSettings, build_push_service
from tests.push.push_fakes import (
    CLIENT_EMAIL,
    KEY_ID,
    PROJECT_ID,
    TEAM_ID,
    TOPIC,
    FakeApns,
    FakeFcm,
    Listeners,
    TlsMaterial,
    TrackingFactory,
    make_tls_material,
    pem_private,
)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def tls_material() -> TlsMaterial:
    return make_tls_material()


@pytest.fixture
def ca_file(tmp_path: Path, tls_material: TlsMaterial) -> str:
    path = tmp_path / "ca.pem"
    path.write_bytes(tls_material.ca_pem)
    return str(path)


@pytest.fixture
def firebase_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "firebase.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT_ID,
                "private_key_id": "k1",
                "private_key": pem_private(rsa_key).decode(),
                "client_email": CLIENT_EMAIL,
                "token_uri": "https://oauth2.invalid/token",
            }
        )
    )
    return str(path)


@pytest.fixture
def apns_files(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    cfg = tmp_path / "apns.json"
    cfg.write_text(json.dumps({"keyId": KEY_ID, "teamId": TEAM_ID, "production": False}))
    key = tmp_path / "AuthKey.p8"
    key.write_bytes(pem_private(ec_key))
    return str(cfg), str(key)


@pytest_twisted.async_yield_fixture
async def listeners(reactor: Any) -> AsyncIterator[Listeners]:
    """Ports to stop at the end of the test (after the services, which depend on this fixture)."""
    ports = Listeners()
    yield ports
    await ports.stop(reactor)


@pytest_twisted.async_yield_fixture
async def services(listeners: Listeners) -> AsyncIterator[list[PushService]]:
    """Push services to stop (closing their connections) at the end of the test, before the listeners."""
    created: list[PushService] = []
    yield created
    for service in created:
        await service.stopService()


@pytest.fixture
def fake_fcm(reactor: Any, rsa_key: rsa.RSAPrivateKey, listeners: Listeners) -> FakeFcm:
    fake = FakeFcm(rsa_key.public_key(), PROJECT_ID, CLIENT_EMAIL)
    site = TrackingFactory(Site(fake, timeout=None))
    port = listeners.add(reactor.listenTCP(0, site, interface="127.0.0.1"), site.tracker)
    fake.base_url = f"http://127.0.0.1:{port}"
    return fake


@pytest.fixture
def fake_apns(
    reactor: Any, ec_key: ec.EllipticCurvePrivateKey, tls_material: TlsMaterial, listeners: Listeners
) -> tuple[FakeApns, TrackingFactory, int]:
    fake = FakeApns(ec_key.public_key(), KEY_ID, TEAM_ID, TOPIC)
    site = TrackingFactory(Site(fake, timeout=None))
    options = tls_material.server_options([b"h2", b"http/1.1"])
    port = listeners.add(reactor.listenSSL(0, site, options, interface="127.0.0.1"), site.tracker)
    return fake, site, port


@pytest.fixture
def make_service(
    reactor: Any,
    services: list[PushService],
    firebase_file: str,
    apns_files: tuple[str, str],
    ca_file: str,
) -> Callable[..., PushService]:
    """Build a started PushService from settings overrides (fast retries, no throttle by default)."""

    def make(clock: Any = None, throttle: Any = None, **overrides: Any) -> PushService:
        values: dict[str, Any] = {
            "firebase_cfg_file": firebase_file,
            "apns_cfg_file": apns_files[0],
            "apns_path_key": apns_files[1],
            "apns_topic": TOPIC,
            "apns_host": "127.0.0.1",
            "push_ca_file": ca_file,
            "push_throttle_ms": 0,
            "push_backoff_ms": 10,
            "push_timeout_ms": 5000,
        }
        values.update(overrides)
        service = build_push_service(PushSettings(**values), reactor, throttle or MemoryThrottle(reactor), clock=clock)
        service.startService()
        services.append(service)
        return service

    return make
