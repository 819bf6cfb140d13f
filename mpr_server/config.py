"""Configuration: environment variables (the original server's names and defaults) and the
matching ``twistd mpr`` options, checked once and frozen into :class:`Config`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.python import usage

from mpr_server.auth import AuthSettings
from mpr_server.push.settings import PushSettings


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off", "")


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError("accepted values: true/false, 1/0, yes/no")


def parse_port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError("accepted values: a TCP port number 0-65535")
    return port


def _bounded(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"accepted values: an integer >= {low}") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"accepted values: an integer from {low}" + (f" to {high}" if high else ""))
        return number

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError("accepted values: " + ", ".join(choices))
        return lowered

    return parse


def _text(value: str) -> str:
    return value


def _write_concern(value: str) -> str:
    value = value.strip()
    if value and value != "majority" and not (value.isdigit() and 1 <= int(value) <= 50):
        raise ValueError("accepted values: majority, or a number of members from 1 to 50")
    return value


MAX_WORKERS = 64


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(f"accepted values: auto, or an integer from 1 to {MAX_WORKERS}")
    return number


def _instance_id(value: str) -> str:
    if not value or len(value) > 64 or "/" in value or any(c.isspace() for c in value):
        raise ValueError("accepted values: up to 64 characters, no '/' or spaces")
    return value


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    parse: Callable[[str], Any]
    doc: str

    @property
    def option(self) -> str:
        return self.env.lower().replace("_", "-")

    @property
    def attr(self) -> str:
        return self.env.lower()


MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("WS_PORT", "3100", parse_port, "WebSocket JSON-RPC port for mediators"),
    Setting("APP_PORT", "3500", parse_port, "HTTP port for /health, /ready and /metrics"),
    Setting(
        "WS_ENDPOINT",
        None,
        _text,
        "Twisted endpoint string for the WebSocket listener (overrides WS_PORT),"
        " e.g. ssl:3100:privateKey=key.pem:certKey=cert.pem",
    ),
    Setting("APP_ENDPOINT", None, _text, "Twisted endpoint string for the HTTP listener (overrides APP_PORT)"),
    Setting(
        "MPR_STORE",
        None,
        _choice("embedded", "redis"),
        "store: embedded (SQLite) or redis (Redis + MongoDB); default: redis when REDIS_URL,"
        " REDIS_TYPE=cluster or MONGODB_URI is set, else embedded",
    ),
    Setting(
        "MPR_WORKERS",
        "1",
        _workers,
        "worker processes sharing the listeners (redis store; auto: one per CPU); each is an MPR instance",
    ),
    Setting(
        "WS_REUSE_PORT",
        "false",
        parse_bool,
        "let several MPR processes on this host share WS_PORT (SO_REUSEPORT; redis store only)",
    ),
    Setting("MPR_DATA_DIR", "mpr-data", _text, "directory of the embedded store"),
    Setting(
        "MPR_SQLITE_SYNCHRONOUS",
        "normal",
        _choice("normal", "full"),
        "embedded store fsync policy: normal survives a process crash, full also a power loss",
    ),
    Setting(
        "MPR_INSTANCE_ID",
        None,
        _instance_id,
        "name of this MPR instance in logs and Redis; a random suffix is added at every start so that"
        " the sessions of a previous run are recognised as dead",
    ),
    Setting(
        "MPR_AUTH_TOKENS",
        "",
        _text,
        "comma-separated shared secrets; when set (or MPR_AUTH_JWT_KEY), mediators must present one as"
        " ?token= or Authorization: Bearer",
    ),
    Setting(
        "MPR_AUTH_JWT_KEY",
        "",
        _text,
        "accept JWTs (with exp) signed with this HS256 secret, or with the key in this PEM file for RS256/ES256",
    ),
    Setting("MPR_AUTH_JWT_AUDIENCE", "", _text, "required aud claim of mediator JWTs (empty: not checked)"),
    Setting(
        "MESSAGE_LEASE_MS",
        "60000",
        _bounded(1000),
        "how long a delivered message stays leased awaiting acknowledgement",
    ),
    Setting(
        "SESSION_GRACE_MS",
        "10000",
        _bounded(0),
        "how long the live sessions of a socket that connected with socket_id survive its disconnection",
    ),
    Setting("MAX_MESSAGE_BYTES", str(10 * MiB), _bounded(1), "largest accepted message payload (compact JSON bytes)"),
    Setting(
        "SLOW_READER_TIMEOUT_MS",
        "30000",
        _bounded(100),
        "a mediator that does not read its replies for this long (or lets 16 MiB of notifications pile up"
        " meanwhile) is disconnected",
    ),
    Setting(
        "MESSAGE_TTL_MS",
        "0",
        _bounded(0),
        "delete messages not acknowledged within this many ms of their arrival (0: keep them until acknowledged)",
    ),
    Setting(
        "MAX_QUEUED_MESSAGES",
        "0",
        _bounded(0),
        "per-connection cap on queued messages; addMessage beyond it gets error -32001 Queue full (0: no cap)",
    ),
    Setting(
        "WS_PING_INTERVAL_MS",
        "30000",
        _bounded(100),
        "WebSocket ping sent to a mediator after this long without traffic (detects sockets that vanished)",
    ),
    Setting(
        "WS_PING_TIMEOUT_MS",
        "20000",
        _bounded(100),
        "a mediator that does not answer a ping within this time is disconnected; its sessions and leases are released",
    ),
    Setting("MAX_FRAME_BYTES", str(100 * MiB), _bounded(1024), "largest accepted WebSocket frame/message"),
    Setting(
        "CALL_TIMEOUT_MS",
        "1500",
        _bounded(10),
        "a call that the store does not answer within this time gets an error (the client gives up after 2000)",
    ),
    Setting("REDIS_TYPE", "single", _choice("single", "cluster"), "Redis deployment: single or cluster"),
    Setting(
        "REDIS_URL",
        "redis://localhost:6379",
        _text,
        "Redis URL (single mode): redis://[user:password@]host:port[/db] or rediss:// for TLS",
    ),
    Setting("REDIS_NODES", "", _text, "cluster seed nodes: host:port,host:port"),
    Setting("REDIS_NATMAP", "", _text, "cluster NAT map: announcedHost:announcedPort:reachableHost:reachablePort,..."),
    Setting("ALLOW_EVICTING_REDIS", "false", parse_bool, "start even if Redis may evict keys (loses queued messages)"),
    Setting(
        "REDIS_WAIT_REPLICAS",
        "0",
        _bounded(0, 16),
        "replicas that must acknowledge (WAIT) each change before a mediator is told it succeeded;"
        " fewer within CALL_TIMEOUT_MS gives an error (see docs/guarantees.rst; 0: do not wait)",
    ),
    Setting("INSTANCE_TTL_MS", "10000", _bounded(1000), "liveness TTL of an MPR instance in Redis"),
    Setting("MONGODB_URI", "mongodb://localhost:27017/MessagePickupRepository", _text, "MongoDB URI for cold storage"),
    Setting(
        "MONGODB_WRITE_CONCERN",
        "",
        _write_concern,
        "write concern w of the cold-storage writes: majority, or a number of members (default: majority"
        " when MONGODB_URI names a replicaSet, else 1)",
    ),
    Setting("THRESHOLD_TIMESTAMP", "60000", _bounded(0), "messages older than this (ms) move from Redis to MongoDB"),
    Setting("FIREBASE_CFG_FILE", "", _text, "FCM service-account JSON file"),
    Setting("APNS_CFG_FILE", "", _text, "APNs JSON file {keyId, teamId, production}"),
    Setting("APNS_PATH_KEY", "", _text, "APNs .p8 signing key file"),
    Setting("APNS_TOPIC", "", _text, "APNs topic (the app bundle id)"),
    Setting("NOTIFICATION_DATA_ONLY", "false", parse_bool, "send data-only (silent) pushes with no visible alert"),
    Setting("PUSH_TITLE", "New message", _text, "title of the visible push notification"),
    Setting("PUSH_BODY", "You have a new message", _text, "body of the visible push notification"),
    Setting("PUSH_THROTTLE_MS", "5000", _bounded(0), "at most one push per device token per this many ms"),
    Setting("PUSH_CONCURRENCY", "32", _bounded(1), "pushes in flight at once"),
    Setting("PUSH_MAX_ATTEMPTS", "3", _bounded(1, 10), "attempts per push for transient failures"),
    Setting("FCM_BASE_URL", "https://fcm.googleapis.com", _text, "FCM API base URL"),
    Setting("FCM_TOKEN_URL", "", _text, "OAuth2 token URL (default: token_uri of the service-account file)"),
    Setting(
        "APNS_HOST", "", _text, "APNs host (default by production: api.push.apple.com / api.sandbox.push.apple.com)"
    ),
    Setting("APNS_PORT", "443", parse_port, "APNs port"),
    Setting("PUSH_CA_FILE", "", _text, "PEM bundle trusted for FCM and APNs instead of the system roots"),
)

BY_ENV = {s.env: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    ws_endpoint: str
    ws_port: int
    ws_reuse_port: bool
    app_endpoint: str
    store: str
    data_dir: str
    sqlite_synchronous: str
    instance_id: str
    message_lease_ms: int
    session_grace_ms: int
    max_message_bytes: int
    max_frame_bytes: int
    max_queued_messages: int
    message_ttl_ms: int
    slow_reader_timeout_ms: int
    ws_ping_interval_ms: int
    ws_ping_timeout_ms: int
    call_timeout_ms: int
    redis_type: str
    redis_url: str
    redis_nodes: str
    redis_natmap: str
    redis_wait_replicas: int
    allow_evicting_redis: bool
    instance_ttl_ms: int
    mongodb_uri: str
    mongodb_write_concern: str
    threshold_timestamp: int
    push: PushSettings
    auth: AuthSettings
    workers: int = 1
    inherited_ws: tuple[int, int] | None = None  # (fd, address family) of a worker's WebSocket listener


def load(values: Mapping[str, str | None], environ: Mapping[str, str]) -> Config:
    """Build the config from explicit option values (by env name; None = not given) over the
    environment over the defaults. Raises ConfigError naming the variable."""

    explicit: dict[str, str] = {}
    for s in SETTINGS:
        given = values.get(s.env)
        if given is not None:
            explicit[s.env] = given
        elif s.env in environ:
            explicit[s.env] = environ[s.env]

    parsed: dict[str, Any] = {}
    for s in SETTINGS:
        raw = explicit.get(s.env, s.default)
        if raw is None:
            parsed[s.env] = None
            continue
        try:
            parsed[s.env] = s.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{s.env}={raw!r} is invalid: {e}") from None

    store = parsed["MPR_STORE"]
    if store is None:
        distributed = "REDIS_URL" in explicit or "MONGODB_URI" in explicit or parsed["REDIS_TYPE"] == "cluster"
        store = "redis" if distributed else "embedded"
    if parsed["WS_REUSE_PORT"] and (store != "redis" or parsed["WS_ENDPOINT"]):
        raise ConfigError(
            "WS_REUSE_PORT=true needs the redis store (processes sharing a port must share the store)"
            " and WS_PORT rather than WS_ENDPOINT"
        )
    if parsed["REDIS_TYPE"] == "cluster" and store == "redis" and not parsed["REDIS_NODES"]:
        raise ConfigError("REDIS_NODES must list the cluster nodes (host:port,...) when REDIS_TYPE=cluster")
    if store == "redis":
        _check_addresses(parsed)

    push = PushSettings(
        firebase_cfg_file=parsed["FIREBASE_CFG_FILE"] or None,
        apns_cfg_file=parsed["APNS_CFG_FILE"] or None,
        apns_path_key=parsed["APNS_PATH_KEY"] or None,
        apns_topic=parsed["APNS_TOPIC"] or None,
        notification_data_only=parsed["NOTIFICATION_DATA_ONLY"],
        push_title=parsed["PUSH_TITLE"],
        push_body=parsed["PUSH_BODY"],
        push_throttle_ms=parsed["PUSH_THROTTLE_MS"],
        push_concurrency=parsed["PUSH_CONCURRENCY"],
        push_max_attempts=parsed["PUSH_MAX_ATTEMPTS"],
        fcm_base_url=parsed["FCM_BASE_URL"],
        fcm_token_url=parsed["FCM_TOKEN_URL"] or None,
        apns_host=parsed["APNS_HOST"] or None,
        apns_port=parsed["APNS_PORT"],
        push_ca_file=parsed["PUSH_CA_FILE"] or None,
    )
    auth = _auth_settings(parsed)
    return Config(
        ws_endpoint=parsed["WS_ENDPOINT"] or f"tcp:{parsed['WS_PORT']}:backlog=511",
        ws_port=parsed["WS_PORT"],
        ws_reuse_port=parsed["WS_REUSE_PORT"],
        app_endpoint=parsed["APP_ENDPOINT"] or f"tcp:{parsed['APP_PORT']}:backlog=511",
        store=store,
        data_dir=parsed["MPR_DATA_DIR"],
        sqlite_synchronous=parsed["MPR_SQLITE_SYNCHRONOUS"].upper(),
        instance_id=f"{parsed['MPR_INSTANCE_ID'] or 'mpr'}-{uuid.uuid4().hex[:8]}",
        message_lease_ms=parsed["MESSAGE_LEASE_MS"],
        session_grace_ms=parsed["SESSION_GRACE_MS"],
        max_message_bytes=parsed["MAX_MESSAGE_BYTES"],
        max_frame_bytes=parsed["MAX_FRAME_BYTES"],
        max_queued_messages=parsed["MAX_QUEUED_MESSAGES"],
        message_ttl_ms=parsed["MESSAGE_TTL_MS"],
        slow_reader_timeout_ms=parsed["SLOW_READER_TIMEOUT_MS"],
        ws_ping_interval_ms=parsed["WS_PING_INTERVAL_MS"],
        ws_ping_timeout_ms=parsed["WS_PING_TIMEOUT_MS"],
        call_timeout_ms=parsed["CALL_TIMEOUT_MS"],
        redis_type=parsed["REDIS_TYPE"],
        redis_url=parsed["REDIS_URL"],
        redis_nodes=parsed["REDIS_NODES"],
        redis_natmap=parsed["REDIS_NATMAP"],
        redis_wait_replicas=parsed["REDIS_WAIT_REPLICAS"],
        allow_evicting_redis=parsed["ALLOW_EVICTING_REDIS"],
        instance_ttl_ms=parsed["INSTANCE_TTL_MS"],
        mongodb_uri=parsed["MONGODB_URI"],
        mongodb_write_concern=parsed["MONGODB_WRITE_CONCERN"],
        threshold_timestamp=parsed["THRESHOLD_TIMESTAMP"],
        push=push,
        auth=auth,
        workers=_check_workers(parsed, store),
    )


def _check_addresses(parsed: Mapping[str, Any]) -> None:
    """The Redis and MongoDB addresses of the distributed store must parse, so that a typo stops
    start-up here, named, rather than later while building clients. URLs are not echoed: they may
    hold passwords."""
    from mpr_server.redis.url import parse_natmap, parse_nodes, parse_redis_url
    from mpr_server.stores.mongo.uri import parse_mongodb_uri

    checks: list[tuple[str, Callable[[str], object], bool]] = [
        ("MONGODB_URI", parse_mongodb_uri, False),
        ("REDIS_NATMAP", parse_natmap, True),
    ]
    if parsed["REDIS_TYPE"] == "cluster":
        checks.insert(0, ("REDIS_NODES", parse_nodes, True))
    else:
        checks.insert(0, ("REDIS_URL", parse_redis_url, False))
    for env, parse, echo in checks:
        raw = parsed[env]
        if env == "REDIS_NATMAP" and not raw:
            continue
        try:
            parse(raw)
        except ValueError as e:
            shown = f"={raw!r}" if echo else ""
            raise ConfigError(f"{env}{shown} is invalid: {e}") from None


def _check_workers(parsed: Mapping[str, Any], store: str) -> int:
    workers: int = parsed["MPR_WORKERS"]
    if workers > 1 and store == "redis":
        endpoint = parsed["WS_ENDPOINT"]
        if endpoint and not endpoint.startswith(("tcp:", "tcp6:")):
            raise ConfigError(
                "MPR_WORKERS above 1 shares one TCP listener between processes: WS_ENDPOINT must be a tcp: endpoint"
                " (terminate TLS in front of MPR)"
            )
        if parsed["WS_REUSE_PORT"]:
            raise ConfigError("MPR_WORKERS and WS_REUSE_PORT are two ways to share the port: use one of them")
    return workers


def _auth_settings(parsed: Mapping[str, Any]) -> AuthSettings:
    tokens = tuple(t.strip() for t in parsed["MPR_AUTH_TOKENS"].split(",") if t.strip())
    if any(len(t) < 16 for t in tokens):
        raise ConfigError("MPR_AUTH_TOKENS entries must be at least 16 characters long")
    key = parsed["MPR_AUTH_JWT_KEY"] or None
    algorithms: tuple[str, ...] = ("HS256",)
    if key is not None and os.path.isfile(key):
        try:
            with open(key) as f:
                key = f.read()
        except OSError as e:
            raise ConfigError(f"MPR_AUTH_JWT_KEY: cannot read {key}: {e}") from None
        if "PUBLIC KEY" not in key:
            raise ConfigError("MPR_AUTH_JWT_KEY file must hold a PEM public key (RS256/ES256)")
        algorithms = ("RS256", "ES256")
    elif key is not None and len(key) < 32:
        raise ConfigError("MPR_AUTH_JWT_KEY as an HS256 secret must be at least 32 characters long")
    return AuthSettings(tokens, key, algorithms, parsed["MPR_AUTH_JWT_AUDIENCE"] or None)


class Options(usage.Options):
    """``twistd mpr`` options; each mirrors an environment variable, which is its default."""

    optParameters = [[s.option, None, None, f"{s.doc} [env {s.env}, default {s.default!r}]"] for s in SETTINGS]

    def postOptions(self) -> None:
        values = {s.env: self[s.option] for s in SETTINGS}
        self.given = values  # as given on the command line (worker processes get them too)
        try:
            self.config = load(values, os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
