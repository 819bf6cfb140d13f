"""Every benchmark scenario, side by side with the floor of the stack, on this machine.

    python bench/run.py [--seconds 10] [--scenarios add,drain,notify,scale,restart] [--workers 1,2]

Starts its own redis-server and mongod (scripts/services), the floor server (bench/floor.py) and
mpr-server processes (``twistd -n mpr``) on 127.0.0.1, drives them with the Node load generator
(bench/loadgen.mjs) or, for live notifications, bench/bench.py, and prints a table: calls per
second, latency, CPU microseconds per call of the server processes (all their workers), of Redis
and of the generator, and ours / floor. Note the machine with the figures: the generator runs on
the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.services.mongo import start_mongod  # noqa: E402
from scripts.services.process import accepts, free_port, wait_until  # noqa: E402
from scripts.services.redis import start_redis  # noqa: E402

TWISTD = str(Path(sys.executable).parent / "twistd")
# calls in flight per socket (32 sockets): the original's figures were taken this way
OPTIONS = {"window": 1}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants, alive now."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    ws_port: int
    app_port: int = 0
    log: Path | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Env:
    redis_port: int
    redis_pid: int
    mongo_uri: str
    tmp: Path
    servers: list[Server] = field(default_factory=list)


def start_floor(env: Env) -> Server:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--port", str(port), "--redis-port", str(env.redis_port)],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: accepts(port), "floor server", 15, proc)
    server = Server("floor", proc, port)
    env.servers.append(server)
    return server


def start_mpr(env: Env, store: str, workers: int = 1, extra: dict[str, str] | None = None) -> Server:
    ws, app = free_port(), free_port()
    data = tempfile.mkdtemp(dir=env.tmp)
    settings = {
        "WS_ENDPOINT": f"tcp:{ws}:interface=127.0.0.1",
        "APP_ENDPOINT": f"tcp:{app}:interface=127.0.0.1",
        "MPR_DATA_DIR": data,
        "MPR_STORE": store,
    }
    if store == "redis":
        settings |= {"REDIS_URL": f"redis://127.0.0.1:{env.redis_port}", "MONGODB_URI": env.mongo_uri}
    if workers != 1:
        settings["MPR_WORKERS"] = str(workers)
    settings |= extra or {}
    log = Path(data) / "mpr.log"
    environ = {**os.environ, **settings, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "mpr"], env=environ, stdout=out, stderr=out, cwd=data)
    wait_until(lambda: accepts(ws) and b"serving:" in log.read_bytes(), f"mpr-server ({store})", 30, proc, log)
    server = Server(f"mpr {store}" + (f" x{workers}" if workers != 1 else ""), proc, ws, app, log)
    env.servers.append(server)
    return server


def loadgen(server: Server, **options: Any) -> tuple[dict[str, Any], float]:
    """Run the Node generator; its result and its own CPU seconds."""
    before = os.times()
    out = subprocess.run(
        [
            "node",
            str(ROOT / "bench" / "loadgen.mjs"),
            json.dumps({"url": f"ws://127.0.0.1:{server.ws_port}", **options}),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=options.get("seconds", 10) + 120,
    )
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(out.stdout.strip().splitlines()[-1]), cpu


def measured(env: Env, server: Server, **options: Any) -> dict[str, Any]:
    """A generator run with the CPU per call of the server, Redis and the generator."""
    options.setdefault("window", OPTIONS["window"])
    server_cpu, redis_cpu = cpu_seconds(server.proc.pid), cpu_seconds(env.redis_pid)
    result, gen_cpu = loadgen(server, **options)
    server_cpu = cpu_seconds(server.proc.pid) - server_cpu
    redis_cpu = cpu_seconds(env.redis_pid) - redis_cpu
    count = result.get("calls") or result.get("messages") or 1
    result |= {
        "server_us": server_cpu / count * 1e6,
        "redis_us": redis_cpu / count * 1e6,
        "generator_us": gen_cpu / count * 1e6,
        "server_cores": server_cpu / result["seconds"],
    }
    return result


Row = dict[str, Any]


def row(scenario: str, target: str, result: dict[str, Any], floor: dict[str, Any] | None = None) -> Row:
    out: Row = {"scenario": scenario, "target": target, **result}
    if floor is not None and result.get("per_second"):
        out["vs_floor"] = result["per_second"] / floor["per_second"]
        out["cpu_vs_floor"] = result["server_us"] / floor["server_us"]
    return out


def scenario_add(env: Env, args: argparse.Namespace) -> Iterator[Row]:
    floor = start_floor(env)
    base = measured(env, floor, mode="add", seconds=args.seconds, connections=1000, run="floor")
    floor.stop()
    yield row("add 1 KiB", "floor", base, base)
    for store in ("redis", "embedded"):
        for workers in args.workers if store == "redis" else [1]:
            server = start_mpr(env, store, workers)
            result = measured(env, server, mode="add", seconds=args.seconds, connections=1000, run=f"add{workers}")
            yield row("add 1 KiB", server.name, result, base)
            if "drain" in args.scenarios:
                drained = measured(env, server, mode="drain", connections=1000, run=f"add{workers}")
                yield row("take10+remove", server.name, drained)
            server.stop()


def scenario_scale(env: Env, args: argparse.Namespace) -> Iterator[Row]:
    """Cost per add with 10x the connections, and onto queues 10x longer."""
    server = start_mpr(env, "redis")
    for label, connections, preload in (("1k conns", 1000, 0), ("10k conns", 10_000, 0), ("10x queues", 1000, 9)):
        for _ in range(preload):
            loadgen(server, mode="add", seconds=args.seconds, connections=connections, run="deep")
        result = measured(env, server, mode="add", seconds=args.seconds, connections=connections, run="deep")
        yield row(f"add, {label}", server.name, result)
    server.stop()


def scenario_notify(env: Env, args: argparse.Namespace) -> Iterator[Row]:
    a, b = start_mpr(env, "redis"), start_mpr(env, "redis")
    for rate in (200, 1000):
        before = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "bench.py"),
                "--port",
                str(a.ws_port),
                "--notify-port",
                str(b.ws_port),
                "--rate",
                str(rate),
                "--seconds",
                str(args.seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=args.seconds + 120,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["cores_a"] = (cpu_seconds(a.proc.pid) - before[0]) / args.seconds
        result["cores_b"] = (cpu_seconds(b.proc.pid) - before[1]) / args.seconds
        result["lost"] = int(rate * args.seconds) - result["delivered"]
        yield row(f"live A->B {rate}/s", "mpr redis", result)
    a.stop()
    b.stop()


def scenario_restart(env: Env, args: argparse.Namespace) -> Iterator[Row]:
    """Seconds from process start to serving (WebSocket port answers, store open)."""
    for store in ("embedded", "redis"):
        started = time.monotonic()
        server = start_mpr(env, store)
        yield row("start to serving", server.name, {"seconds": time.monotonic() - started})
        server.stop()


SCENARIOS = {"add": scenario_add, "scale": scenario_scale, "notify": scenario_notify, "restart": scenario_restart}


def show(rows: Sequence[Row]) -> None:
    columns = [
        ("scenario", "{}"),
        ("target", "{}"),
        ("per_second", "{:,.0f}/s"),
        ("p50_ms", "{:.1f}"),
        ("p99_ms", "{:.1f}"),
        ("server_us", "{:.0f}"),
        ("server_cores", "{:.2f}"),
        ("redis_us", "{:.0f}"),
        ("generator_us", "{:.0f}"),
        ("vs_floor", "{:.2f}x"),
        ("cpu_vs_floor", "{:.2f}x"),
        ("lost", "{}"),
        ("seconds", "{:.2f}"),
    ]
    present = [(k, f) for k, f in columns if any(k in r for r in rows)]
    cells = [[k for k, _ in present]] + [[f.format(r[k]) if k in r else "" for k, f in present] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(present))]
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


@contextmanager
def services(tmp: Path) -> Iterator[Env]:
    redis = start_redis()
    mongo = start_mongod()
    env = Env(redis.port, redis.pid, f"{mongo.uri}/mpr_bench", tmp)
    try:
        yield env
    finally:
        for server in env.servers:
            server.stop()
        mongo.stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--scenarios", default="add,drain,notify,scale,restart")
    parser.add_argument("--workers", default="1,2", help="worker counts for the Redis store")
    parser.add_argument("--json", action="store_true", help="one JSON line per result instead of a table")
    parser.add_argument("--window", type=int, default=OPTIONS["window"], help="calls in flight per socket")
    args = parser.parse_args()
    args.scenarios = args.scenarios.split(",")
    args.workers = [int(w) for w in args.workers.split(",")]
    OPTIONS["window"] = args.window
    if shutil.which("node") is None:
        sys.exit("bench/run.py needs Node.js for its load generator")
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="mpr-bench-"))
    try:
        with services(tmp) as env:
            for name in args.scenarios:
                for result in SCENARIOS.get(name, lambda env, args: iter(()))(env, args):
                    rows.append(result)
                    if args.json:
                        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"# {os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}; generator on the same cores"
    )
    if not args.json:
        show(rows)


if __name__ == "__main__":
    main()
