"""Optional mediator authentication: shared secrets and JWTs, checked at the handshake."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mpr_server.auth import AuthenticationFailed, Authenticator, AuthSettings
from mpr_server.config import ConfigError, load
from tests.test_rpc import Harness

SECRET = "s3cret-token-for-mediators"
JWT_SECRET = "a-jwt-signing-secret-of-32-characters!"


def headers(value: str | None = None) -> dict[str, str]:
    return {} if value is None else {"authorization": value}


def test_disabled_by_default_accepts_anything() -> None:
    Authenticator(AuthSettings()).check({}, {})


def test_shared_secret_in_query_or_bearer_header() -> None:
    auth = Authenticator(AuthSettings(tokens=("old-secret-still-valid", SECRET)))
    auth.check({"token": [SECRET]}, {})
    auth.check({}, headers(f"Bearer {SECRET}"))
    auth.check({"token": ["old-secret-still-valid"]}, {})
    with pytest.raises(AuthenticationFailed, match="no token"):
        auth.check({}, {})
    with pytest.raises(AuthenticationFailed, match="invalid"):
        auth.check({"token": [SECRET + "x"]}, {})
    with pytest.raises(AuthenticationFailed):
        auth.check({}, headers(f"Basic {SECRET}"))


def test_hs256_jwt_with_expiry_and_audience() -> None:
    auth = Authenticator(AuthSettings(jwt_key=JWT_SECRET, jwt_audience="mpr"))
    good = jwt.encode({"exp": int(time.time()) + 60, "aud": "mpr"}, JWT_SECRET, algorithm="HS256")
    auth.check({"token": [good]}, {})
    expired = jwt.encode({"exp": int(time.time()) - 60, "aud": "mpr"}, JWT_SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationFailed, match="expired"):
        auth.check({"token": [expired]}, {})
    wrong_aud = jwt.encode({"exp": int(time.time()) + 60, "aud": "other"}, JWT_SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationFailed, match=r"(?i)audience"):
        auth.check({"token": [wrong_aud]}, {})
    no_exp = jwt.encode({"aud": "mpr"}, JWT_SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationFailed, match="exp"):
        auth.check({"token": [no_exp]}, {})
    forged = jwt.encode({"exp": int(time.time()) + 60, "aud": "mpr"}, "another-secret-of-32-characters-long", "HS256")
    with pytest.raises(AuthenticationFailed, match=r"(?i)signature"):
        auth.check({"token": [forged]}, {})


def test_es256_jwt_with_a_public_key_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "mediators.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = load({}, {"MPR_AUTH_JWT_KEY": str(public)})
    auth = Authenticator(config.auth)
    auth.check({"token": [jwt.encode({"exp": int(time.time()) + 60}, key, algorithm="ES256")]}, {})
    # An HS256 token "signed" with the public key text must not pass (algorithm confusion).
    with pytest.raises(AuthenticationFailed):
        auth.check({"token": [jwt.encode({"exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")]}, {})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MPR_AUTH_TOKENS": "short"}, "at least 16"),
        ({"MPR_AUTH_JWT_KEY": "too-short"}, "at least 32"),
    ],
)
def test_weak_settings_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load({}, environ)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    harness.factory.authenticator = Authenticator(AuthSettings(tokens=(SECRET,)))
    yield harness
    harness.run(harness.store.stop())


def test_handshake_without_the_token_is_refused_and_with_it_served(h: Harness) -> None:
    refused = h.connect("?socket_id=m1", expect_open=False)
    assert refused.closed.called
    refused.opened.addErrback(lambda _: None)
    served = h.connect(f"?socket_id=m1&token={SECRET}")
    assert h.call(served, "ping") == "pong"
