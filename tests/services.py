"""Session-scoped fixtures that run real Redis, Redis Cluster and mongod servers.

The servers are started by the scripts.services package on free 127.0.0.1 ports,
once per test session, and stopped (by pid) at the end of it. With
MPR_TEST_REQUIRE_SERVICES=1 (CI) a server that cannot be installed or started
fails the tests that need it; otherwise they are skipped, loudly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import pytest

from scripts.services.mongo import start_mongod
from scripts.services.process import ServiceError
from scripts.services.redis import start_redis, start_redis_cluster

T = TypeVar("T")


def services_required() -> bool:
    return os.environ.get("MPR_TEST_REQUIRE_SERVICES", "").strip().lower() in ("1", "true", "yes")


def unavailable(what: str, error: BaseException) -> NoReturn:
    """Fail (CI) or skip loudly (locally) when a real service cannot be had."""
    message = f"{what} unavailable: {error}"
    if services_required():
        pytest.fail(f"{message} (MPR_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    warnings.warn(f"SKIPPING tests that need {message}", stacklevel=2)
    pytest.skip(f"{message} (set MPR_TEST_REQUIRE_SERVICES=1 to make this a failure)")


@dataclass(frozen=True)
class RedisSingle:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


@dataclass(frozen=True)
class RedisCluster:
    nodes: tuple[tuple[str, int], ...]

    @property
    def nodes_string(self) -> str:
        """The REDIS_NODES form: host:port,host:port,..."""
        return ",".join(f"{h}:{p}" for h, p in self.nodes)


@dataclass(frozen=True)
class Mongo:
    host: str
    port: int

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}"


def start_or_skip(what: str, start: Callable[[], T]) -> T:
    """Run `start()` (a scripts.services starter); a failure to install/start fails (CI) or skips."""
    try:
        return start()
    except (ServiceError, OSError) as e:
        unavailable(what, e)


@pytest.fixture(scope="session")
def redis_single() -> Iterator[RedisSingle]:
    server = start_or_skip("redis-server", start_redis)
    try:
        yield RedisSingle(server.host, server.port)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = start_or_skip("redis cluster", lambda: start_redis_cluster(masters=3, replicas=0))
    try:
        yield RedisCluster(tuple((n.host, n.port) for n in cluster.nodes))
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mongod() -> Iterator[Mongo]:
    server = start_or_skip("mongod", start_mongod)
    try:
        yield Mongo(server.host, server.port)
    finally:
        server.stop()
