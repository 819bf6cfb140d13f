"""Using every core: ``MPR_WORKERS=N`` (Redis store).

The supervisor (the ``twistd mpr`` process) binds the WebSocket listener once and starts N worker
processes that all accept on it (the kernel hands each new connection to one of them). Each
worker is a whole MPR instance with its own instance id, on the shared Redis and MongoDB, so
live notifications, leases and liveness work across workers as across hosts. The supervisor
restarts a worker that dies, stops them all with SIGTERM (each closes its mediator sockets with
1001), and serves ``APP_PORT`` itself: ``/health`` and ``/ready`` answer for all the workers,
``/metrics`` merges theirs with a ``worker`` label. Workers serve their own HTTP on loopback
ports the supervisor knows.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import treq
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mpr_server import __version__
from mpr_server._async import Waiters, deadline, gather
from mpr_server.config import Config

WORKER_FD = 3  # the listener's descriptor in a worker
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 2.0
SERVING = re.compile(r"serving: .*?http=(?P<http>\S+) instance=(?P<instance>\S+)")


class _Worker(ProcessProtocol):
    """One worker process: its output is relayed line by line to the supervisor's log."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.http: str | None = None
        self.instance: str | None = None
        self.restarts = 0
        self.ended: Waiters[None] = Waiters()
        self.alive = False
        self._partial = b""

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    def connectionMade(self) -> None:
        self.alive = True
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.supervisor.worker_said(self, line.decode("utf-8", "replace").rstrip())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        self.http = None
        self.ended.fire(None)
        self.supervisor.worker_ended(self, reason)


class Supervisor(Service):
    """The ``twistd mpr`` service when ``MPR_WORKERS`` > 1; see the module docstring."""

    _log = Logger()

    def __init__(self, config: Config, values: Mapping[str, str | None], reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self._values = values
        self._workers = [_Worker(self, i) for i in range(config.workers)]
        self._ready: dict[int, Waiters[None]] = {i: Waiters() for i in range(config.workers)}
        self._ws: IListeningPort | None = None
        self._http: IListeningPort | None = None
        self._restart_calls: dict[int, IDelayedCall] = {}
        self._stopping = False
        self.ready: Deferred[None] = Deferred()

    # -- life cycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        ws = await endpoints.serverFromString(self.reactor, self.config.ws_endpoint).listen(Factory())
        ws.stopReading()  # the workers accept, not us
        self._ws = ws
        waits = [self._ready[w.index].wait() for w in self._workers]
        for worker in self._workers:
            self._spawn(worker)
        started = await deadline(
            gather(waits), START_TIMEOUT_S, self.reactor, lambda: RuntimeError("workers did not start")
        )
        for outcome in started:
            if isinstance(outcome, Failure):
                outcome.raiseException()
        self._http = await endpoints.serverFromString(self.reactor, self.config.app_endpoint).listen(self._site())
        self._log.info(
            "mpr-server {version} serving: store={store} websocket={ws} http={http} instance={instance}"
            " workers={workers}",
            version=__version__,
            store=self.config.store,
            ws=_address(ws),
            http=_address(self._http),
            instance=self.config.instance_id,
            workers=len(self._workers),
        )
        self.ready.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        self._log.critical("mpr-server could not start: {error}", error=failure.getErrorMessage())
        for worker in self._workers:
            self._signal(worker, signal.SIGKILL)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        self._stopping = True
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        if self._http is not None:
            await maybeDeferred(self._http.stopListening)
        alive = [w for w in self._workers if w.alive]
        ended = [w.ended.wait() for w in alive]
        for worker in alive:
            self._signal(worker, signal.SIGTERM)
        try:
            await deadline(gather(ended), STOP_TIMEOUT_S, self.reactor, lambda: TimeoutError())
        except TimeoutError:
            for worker in self._workers:
                if worker.alive:
                    self._log.warn("worker {n} did not stop: killing it", n=worker.index)
                    self._signal(worker, signal.SIGKILL)
        if self._ws is not None:
            await maybeDeferred(self._ws.stopListening)

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        assert self._ws is not None
        env = {**os.environ, **{k: v for k, v in self._values.items() if v is not None}}
        base = self._values.get("MPR_INSTANCE_ID") or os.environ.get("MPR_INSTANCE_ID") or "mpr"
        env |= {
            "MPR_WORKERS": "1",
            "MPR_INSTANCE_ID": f"{base}-w{worker.index}",
            "APP_ENDPOINT": "tcp:0:interface=127.0.0.1",
            "MPR_WORKER_LISTENER": f"{WORKER_FD}:{self._family()}",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("APP_PORT", None)
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "mpr_server.workers"],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", WORKER_FD: self._ws.fileno()},  # type: ignore[attr-defined]
        )

    def _family(self) -> int:
        host = self._ws.getHost() if self._ws is not None else None
        return (
            socket.AF_INET6
            if getattr(host, "type", "") == "TCP" and ":" in getattr(host, "host", "")
            else socket.AF_INET
        )

    def worker_said(self, worker: _Worker, line: str) -> None:
        found = SERVING.search(line)
        if found is not None:
            worker.http, worker.instance = found["http"], found["instance"]
            self._log.info(
                "worker {n} (pid {pid}) serving as instance {instance}",
                n=worker.index,
                pid=worker.pid,
                instance=worker.instance,
            )
            self._ready[worker.index].fire(None)
        elif line:
            self._log.info("worker {n}: {line}", n=worker.index, line=line)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self._stopping or not self.running:
            return
        if not self.ready.called:  # it could not start (its log says why): neither can we
            self._ready[worker.index].fail(RuntimeError(f"worker {worker.index} ended before serving"))
            return
        worker.restarts += 1
        delay = min(0.5 * 2 ** min(worker.restarts - 1, 6), 30.0)
        self._log.warn(
            "worker {n} ended ({reason}); starting it again in {delay} s",
            n=worker.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restart_calls[worker.index] = self.reactor.callLater(delay, self._spawn, worker)

    def _signal(self, worker: _Worker, sig: signal.Signals) -> None:
        if worker.alive and worker.transport is not None:
            try:
                worker.transport.signalProcess(sig.name.removeprefix("SIG") if sig != signal.SIGKILL else "KILL")
            except OSError:
                pass

    # -- HTTP ------------------------------------------------------------------------------------

    def _site(self) -> Site:
        root = Resource()
        root.putChild(b"health", _Page(self.health))
        root.putChild(b"ready", _Page(self.readiness))
        root.putChild(b"metrics", _Page(self.metrics))
        site = Site(root)
        site.displayTracebacks = False
        site.noisy = False
        return site

    def _status(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": w.index,
                "pid": w.pid,
                "instance": w.instance,
                "serving": w.http is not None,
                "restarts": w.restarts,
            }
            for w in self._workers
        ]

    async def health(self) -> tuple[int, bytes, bytes]:
        workers = self._status()
        up = all(w["serving"] for w in workers)
        body = {"status": "ok" if up else "degraded", "version": __version__, "workers": workers}
        return 200 if up else 503, orjson.dumps(body), b"application/json"

    async def _probe(self, worker: _Worker, path: str) -> tuple[int, bytes]:
        if worker.http is None:
            return 0, b""
        response = await treq.get(f"http://{worker.http}{path}", timeout=PROBE_TIMEOUT_S)
        return response.code, await response.content()

    async def readiness(self) -> tuple[int, bytes, bytes]:
        probes = await gather([self._probe(w, "/ready") for w in self._workers])
        ready = [isinstance(p, tuple) and p[0] == 200 for p in probes]
        body = {"status": "ready" if all(ready) else "unavailable", "store": self.config.store, "workers": ready}
        return 200 if all(ready) else 503, orjson.dumps(body), b"application/json"

    async def metrics(self) -> tuple[int, bytes, bytes]:
        probes = await gather([self._probe(w, "/metrics") for w in self._workers])
        texts = [
            (str(w.index), p[1].decode())
            for w, p in zip(self._workers, probes, strict=True)
            if isinstance(p, tuple) and p[0] == 200
        ]
        return 200, generate_latest(_Merged(texts)), b"text/plain; version=0.0.4; charset=utf-8"


class _Merged:
    """The workers' metrics as one registry, each sample labelled with its worker."""

    def __init__(self, texts: list[tuple[str, str]]) -> None:
        self._texts = texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, text in self._texts:
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    into.samples.append(
                        Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                    )
        yield from merged.values()


class _Page(Resource):
    isLeaf = True

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> int:
        def reply(result: tuple[int, bytes, bytes]) -> None:
            code, body, content_type = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            reply(
                (503, orjson.dumps({"status": "unavailable", "reason": failure.getErrorMessage()}), b"application/json")
            )

        Deferred.fromCoroutine(self._answer()).addCallbacks(reply, failed)
        return NOT_DONE_YET


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"


def main() -> None:
    """A worker process: an MPR instance on the listener the supervisor passed down."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mpr_server.app import build
    from mpr_server.config import load

    fd, family = (int(part) for part in os.environ.pop("MPR_WORKER_LISTENER").split(":"))
    config = dataclasses.replace(load({}, os.environ), inherited_ws=(fd, family))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = build(config, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
