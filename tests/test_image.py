"""The container image and the compose file, checked without a Docker engine: the Dockerfile with
a real parser (dockerfile-parse), the compose file with ``docker-compose config`` (which
validates it against the compose schema, no daemon needed) and by its structure."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from mpr_server.config import BY_ENV, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ["twistd", "-n", "--pidfile=", "mpr"]


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert parser.structure, "the Dockerfile is empty"
    return parser


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_small_base_image_and_twistd_entry_point(dockerfile: DockerfileParser) -> None:
    assert dockerfile.baseimage == "python:3.11-slim"
    (entry,) = instructions(dockerfile, "ENTRYPOINT")
    assert json.loads(entry) == ENTRYPOINT
    runs = " ".join(instructions(dockerfile, "RUN"))
    assert "getPlugins(IPlugin)" in runs  # the plugin cache, written while the tree is writable
    assert "pip install -c constraints.txt ." in runs


def test_runs_as_a_non_root_user_that_owns_the_data_dir(dockerfile: DockerfileParser) -> None:
    order = [i["instruction"] for i in dockerfile.structure]
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    assert order.index("USER") < order.index("ENTRYPOINT")
    assert dockerfile.envs["MPR_DATA_DIR"] == "/data"
    runs = " ".join(instructions(dockerfile, "RUN"))
    assert f"chown {users[-1]} /data" in runs


def test_healthcheck_asks_ready_on_the_app_port_without_curl(dockerfile: DockerfileParser) -> None:
    (check,) = instructions(dockerfile, "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[0] == "python" and command[1] == "-c"
    script = command[2]
    assert "urllib.request" in script and "/ready" in script and "APP_PORT" in script
    compile(script, "healthcheck", "exec")  # a valid one-liner


def test_ports_and_environment_are_those_of_the_readme_table(dockerfile: DockerfileParser) -> None:
    (exposed,) = instructions(dockerfile, "EXPOSE")
    assert exposed.split() == [BY_ENV["WS_PORT"].default, BY_ENV["APP_PORT"].default]
    for name in dockerfile.envs:
        assert name in BY_ENV or name.startswith(("PYTHON", "PIP_")), name
    for copied in instructions(dockerfile, "COPY"):
        for source in shlex.split(copied)[:-1]:
            assert (ROOT / source).exists(), source


def compose_binary() -> list[str]:
    found = shutil.which("docker-compose")
    if found:
        return [found]
    pytest.fail("docker-compose is missing: python -m scripts.services install compose")


def test_compose_file_is_valid_and_builds_the_image() -> None:
    env = dict(os.environ, MPR_AUTH_TOKENS="a-secret-of-more-than-16")
    cmd = [*compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    servers = {name: s for name, s in resolved["services"].items() if name.startswith("mpr")}
    assert len(servers) == 2
    for name, service in servers.items():
        assert Path(service["build"]["context"]).resolve() == ROOT, name
        assert "dockerfile_inline" not in service["build"], name
        environment = service["environment"]
        assert set(environment) <= {s.env for s in SETTINGS}, (name, environment)
        assert environment["MPR_AUTH_TOKENS"] == "a-secret-of-more-than-16"

    without_secret = {k: v for k, v in env.items() if k != "MPR_AUTH_TOKENS"}
    refused = subprocess.run([*cmd, "-q"], cwd=ROOT, env=without_secret, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "MPR_AUTH_TOKENS" in refused.stderr
