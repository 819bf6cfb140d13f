"""Configuration: original variable names and defaults, options mirroring them, clear errors."""

from __future__ import annotations

import pytest
from twisted.python import usage

from mpr_server.config import SETTINGS, ConfigError, Options, load


def test_defaults_are_the_originals_and_the_embedded_store() -> None:
    config = load({}, {})
    assert config.ws_endpoint == "tcp:3100:backlog=511"
    assert config.app_endpoint == "tcp:3500:backlog=511"
    assert config.store == "embedded"
    assert config.message_lease_ms == 60_000
    assert config.max_message_bytes == 10 * 1024 * 1024
    assert config.max_frame_bytes == 100 * 1024 * 1024
    assert config.threshold_timestamp == 60_000
    assert config.push.notification_data_only is False
    assert config.push.push_throttle_ms == 5000


@pytest.mark.parametrize(
    "environ",
    [{"REDIS_URL": "redis://r:6379"}, {"MONGODB_URI": "mongodb://m/db"}, {"MPR_STORE": "redis"}],
)
def test_distributed_store_is_chosen_by_its_settings(environ: dict[str, str]) -> None:
    assert load({}, environ).store == "redis"


def test_cluster_needs_nodes() -> None:
    with pytest.raises(ConfigError, match="REDIS_NODES"):
        load({}, {"REDIS_TYPE": "cluster"})
    assert load({}, {"REDIS_TYPE": "cluster", "REDIS_NODES": "a:1,b:2"}).store == "redis"


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True), ("no", False)]
)
def test_booleans_mean_what_they_say(value: str, expected: bool) -> None:
    assert load({}, {"NOTIFICATION_DATA_ONLY": value}).push.notification_data_only is expected


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("WS_PORT", "http", "TCP port"),
        ("APP_PORT", "70000", "TCP port"),
        ("NOTIFICATION_DATA_ONLY", "maybe", "true/false"),
        ("MPR_STORE", "postgres", "embedded, redis"),
        ("REDIS_TYPE", "sentinel", "single, cluster"),
        ("MESSAGE_LEASE_MS", "-5", "integer"),
        ("THRESHOLD_TIMESTAMP", "soon", "integer"),
        ("MPR_INSTANCE_ID", "a/b", "no '/'"),
    ],
)
def test_bad_values_name_the_variable_and_the_accepted_values(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, {name: value})
    assert name in str(info.value) and accepted in str(info.value)


def test_options_override_the_environment_and_every_variable_has_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_PORT", "4000")
    options = Options()
    options.parseOptions(["--app-port", "4100"])
    assert options.config.ws_endpoint == "tcp:4000:backlog=511"
    assert options.config.app_endpoint == "tcp:4100:backlog=511"
    flags = {p[0] for p in Options.optParameters}
    assert flags == {s.env.lower().replace("_", "-") for s in SETTINGS}


def test_bad_option_is_a_usage_error_naming_the_variable() -> None:
    with pytest.raises(usage.UsageError, match="WS_PORT"):
        Options().parseOptions(["--ws-port", "x"])


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    from scripts.config_table import table

    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    assert table() in readme, "README.rst configuration table is stale: regenerate with scripts/config_table.py"


def test_reuse_port_needs_the_shared_store() -> None:
    with pytest.raises(ConfigError, match="WS_REUSE_PORT"):
        load({}, {"WS_REUSE_PORT": "true"})
    config = load({}, {"WS_REUSE_PORT": "true", "REDIS_URL": "redis://r:6379"})
    assert config.ws_reuse_port and config.ws_port == 3100


@pytest.mark.parametrize(
    ("environ", "name", "says"),
    [
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL", "must start with redis://"),
        ({"REDIS_URL": "redis://user@redis:6379"}, "REDIS_URL", "no password"),
        ({"REDIS_URL": "redis://redis:port"}, "REDIS_URL", "port"),
        ({"REDIS_TYPE": "cluster", "REDIS_NODES": "a:1,b"}, "REDIS_NODES", "host:port"),
        ({"MPR_STORE": "redis", "REDIS_NATMAP": "10.0.0.1:7000"}, "REDIS_NATMAP", "announcedHost"),
        ({"MONGODB_URI": "mongo://db/x"}, "MONGODB_URI", "mongodb://"),
        ({"MONGODB_URI": "mongodb://db/x?tls=maybe"}, "MONGODB_URI", "true or false"),
    ],
)
def test_bad_store_addresses_are_config_errors_naming_the_variable(
    environ: dict[str, str], name: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, environ)
    assert str(info.value).startswith(name) and says in str(info.value), str(info.value)


def test_a_bad_redis_url_is_not_echoed_it_may_hold_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        load({}, {"REDIS_URL": "redis://user:s3cret-pw@redis:notaport"})
    assert "s3cret-pw" not in str(info.value)


def test_store_addresses_are_not_checked_for_the_embedded_store() -> None:
    config = load({}, {"MPR_STORE": "embedded", "REDIS_URL": "http://unused"})
    assert config.store == "embedded"
